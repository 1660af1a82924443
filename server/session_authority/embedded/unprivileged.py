"""Running Postgres's programs when we are root: as an unprivileged account, and how it gets in.

Everything here happens only when `prepare_postgres_account` is called *as root*; as any other
user it returns None and changes nothing. Importing this module does nothing.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import stat
from pathlib import Path

__all__ = ["prepare_postgres_account", "prepare_unprivileged_account"]

_log = logging.getLogger(__name__)

_UNPRIVILEGED_ACCOUNT = "nobody"


def prepare_postgres_account(install_dir: Path, base_dir: Path) -> pwd.struct_passwd | None:
    """The account to run initdb and postgres as: None (ourselves) unless we are root.

    Why: initdb and postgres refuse to run as root ("cannot be run as root"), and this machine
    and CI containers run as root. Their uid is then switched in the child process only
    (Popen user=/group=); ours stays root. The account is the owner of an existing cluster in
    `base_dir`/pgdata (its files must keep their owner), else `nobody`, which every Debian
    (base-passwd) and nearly every other system has: no account is created. The data is
    throwaway and, with trust authentication, open to any local user anyway.

    That account must reach two trees we do not own, so, as root only, this adds the missing
    "other" permission bits there, and nothing else (logged at INFO when it changes any):

    * o+x (traverse, not list) on `base_dir` and each of its parents that lacks it, such as
      pytest's 0700 /tmp/pytest-of-root or tempfile's 0700 directories;
    * in `install_dir` (pgserver's Postgres), o+r on files, o+x on executables, o+rx on
      directories, and o+x on its parents: missing only after pip ran under umask 077, or
      with a virtualenv under a 0700 home such as /root.
    """
    if os.geteuid() != 0:
        return None
    account = _cluster_owner(base_dir / "pgdata") or _unprivileged_account()
    _grant_install(install_dir)
    _grant_traverse(base_dir)
    return account


def prepare_unprivileged_account(base_dir: Path) -> pwd.struct_passwd | None:
    """The account to run a daemon that refuses root (pgbouncer) as: None (ourselves) unless
    we are root, else ``nobody``, given traverse (o+x) on `base_dir` and its parents."""
    if os.geteuid() != 0:
        return None
    account = _unprivileged_account()
    _grant_traverse(base_dir)
    return account


def _cluster_owner(data_dir: Path) -> pwd.struct_passwd | None:
    try:
        uid = data_dir.stat().st_uid
        return pwd.getpwuid(uid) if uid != 0 else None
    except (OSError, KeyError):
        return None


def _unprivileged_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(_UNPRIVILEGED_ACCOUNT)
    except KeyError:
        raise RuntimeError(
            f"Postgres cannot run as root, and there is no {_UNPRIVILEGED_ACCOUNT!r} account "
            "to run it as: create one, or run as an ordinary user"
        ) from None


def _add_mode(path: Path, bits: int) -> bool:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode | bits == mode:
        return False
    path.chmod(mode | bits)
    return True


def _grant_traverse(path: Path) -> None:
    for p in (path, *path.parents):
        if _add_mode(p, stat.S_IXOTH):
            _log.info("chmod o+x %s, for Postgres's unprivileged account", p)


@functools.cache
def _grant_install(root: Path) -> None:
    # Cached: the installed files do not change while we run (1,700 files, walked once).
    _grant_traverse(root)
    changed = 0
    for dirpath, _dirs, files in os.walk(root):
        changed += _add_mode(Path(dirpath), stat.S_IROTH | stat.S_IXOTH)
        for name in files:
            path = Path(dirpath, name)
            if path.is_symlink():
                continue  # chmod would follow it; its target is walked on its own
            executable = path.stat().st_mode & stat.S_IXUSR
            changed += _add_mode(path, stat.S_IROTH | (stat.S_IXOTH if executable else 0))
    if changed:
        _log.info("chmod o+rX on %d entries under %s, for Postgres's account", changed, root)
