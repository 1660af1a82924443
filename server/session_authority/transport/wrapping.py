"""``WrappingInterceptor``, importable from its former place: the machinery
lives in ``session_authority.rpc``, the one copy the transport and
observability share."""

from session_authority.rpc import WrappingInterceptor

__all__ = ["WrappingInterceptor"]
