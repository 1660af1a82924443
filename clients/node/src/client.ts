/**
 * `SessionAuthorityClient`: one typed method per RPC. Each method is the same
 * four steps (build the request, call with the method's deadline, map errors,
 * map the answer), so a new RPC is one small method, one line in `TIMEOUTS`
 * and one name in `IDEMPOTENT` or `NOT_RETRIED` (the same lists as the Python
 * client's `_config.py`; tests/unit/test_client_retry_lists.py checks that
 * both clients classify every RPC of the service alike).
 */

import { createClient, type Client } from "@connectrpc/connect";
import { create } from "@bufbuild/protobuf";
import { DurationSchema } from "@bufbuild/protobuf/wkt";
import { SessionAuthority } from "./gen/session_authority/v1/session_authority_pb.js";
import type { ValidateSessionResponse } from "./gen/session_authority/v1/session_authority_pb.js";
import { SessionAuthorityError, fromConnectError } from "./errors.js";
import {
  toHealth,
  toReason,
  toSession,
  toSource,
  toTouch,
  type CreatedSession,
  type Health,
  type Invalidation,
  type Session,
  type Touch,
  type UserInvalidation,
  type Validation,
} from "./results.js";
import { DEFAULT_RETRY, buildTransport, type RetryListener, type RetryPolicy, type TransportOptions } from "./transport.js";
import { RevocationWatch } from "./watch.js";

/** Deadlines per method, in milliseconds. Every call has one. */
export interface Timeouts {
  readonly validate: number;
  readonly create: number;
  readonly invalidate: number;
  readonly invalidateUser: number;
  readonly health: number;
  /** Per ValidateSessions call (each slice of up to 100 tokens). */
  readonly validateMany: number;
  /** Per page. */
  readonly listSessions: number;
  readonly touch: number;
  /** Until a watch's START event arrives; after it a watch runs until closed. */
  readonly watchStart: number;
}

export const DEFAULT_TIMEOUTS: Timeouts = {
  validate: 1000,
  create: 3000,
  invalidate: 3000,
  invalidateUser: 5000,
  health: 2000,
  validateMany: 2000,
  listSessions: 5000,
  touch: 2000,
  watchStart: 10_000,
};

/** RPCs that may be sent twice with the effect of once: retried on UNAVAILABLE. */
export const IDEMPOTENT: ReadonlySet<string> = new Set([
  "ValidateSession",
  "ValidateSessions",
  "Invalidate",
  "InvalidateUser",
  "Health",
  "ListUserSessions",
  // A touch sets the expiry from the server's now, never backwards: a repeat is harmless.
  "TouchSession",
]);

/**
 * RPCs never retried: CreateSession (a retry after a lost answer would issue a
 * second session) and WatchRevocations (a stream: the watch resumes itself
 * from its last cursor).
 */
export const NOT_RETRIED: ReadonlySet<string> = new Set(["CreateSession", "WatchRevocations"]);

/** Tokens per ValidateSessions call (the server refuses more): longer lists go in slices. */
export const MAX_BATCH = 100;

export interface ClientOptions extends TransportOptions {
  /** Per-method deadlines (ms), overriding DEFAULT_TIMEOUTS. */
  readonly timeouts?: Partial<Timeouts>;
}

/** Per call: a deadline other than the method's default, and a caller's cancellation. */
export interface CallOptions {
  readonly timeoutMs?: number;
  readonly signal?: AbortSignal;
}

export interface CreateOptions {
  /** Seconds; default the server's SESSION_TTL, at most its maximum. */
  readonly ttl?: number;
  /** At most 32 entries; keys up to 64 bytes, values up to 1024 bytes. */
  readonly metadata?: Readonly<Record<string, string>>;
}

export type InvalidateTarget = { readonly token: string } | { readonly sessionId: string };

export interface InvalidateUserOptions {
  /** "Log out everywhere else": the id of one session of this user to keep. */
  readonly exceptSessionId?: string;
}

export interface ListOptions {
  /** Also list revoked (with `revokedAt`) and expired sessions. */
  readonly includeRevoked?: boolean;
  /** Sessions per page: 0 (the default) is the server's default (50); at most 500 are sent. */
  readonly pageSize?: number;
}

/**
 * The session to touch, by token or id, and how far from now its expiry moves (seconds; default
 * the server's SESSION_TTL_DEFAULT_SECONDS). `writeThrough`: answer after the write, with the new
 * expiry; by default a session the server has cached is answered at once (`written: false`, the
 * expiry as it stood) and written behind the answer.
 */
export type TouchTarget = InvalidateTarget & {
  readonly extendBy?: number;
  readonly writeThrough?: boolean;
};

export interface WatchOptions {
  /** Resume after this cursor (a `RevocationEvent.cursor` received before, on any replica); absent: from now. */
  readonly after?: string;
  /** Reopen from the last cursor when the stream ends UNAVAILABLE (default true). */
  readonly resume?: boolean;
}

/**
 * `listSessions`' answer: iterate it for the sessions (`for await`), or
 * `pages()` for one array per page. Each page is one call, with its own
 * deadline; nothing is fetched before the iteration starts.
 */
export interface SessionList extends AsyncIterable<Session> {
  pages(): AsyncIterable<readonly Session[]>;
}

export class SessionAuthorityClient {
  private readonly rpc: Client<typeof SessionAuthority>;
  private readonly timeouts: Timeouts;
  private readonly secrets: readonly string[];
  private readonly closeTransport: () => void;
  private readonly retry: RetryPolicy | undefined;
  private readonly onRetry: RetryListener | undefined;

  constructor(options: ClientOptions) {
    const { transport, close } = buildTransport(options, IDEMPOTENT);
    this.rpc = createClient(SessionAuthority, transport);
    this.timeouts = { ...DEFAULT_TIMEOUTS, ...(options.timeouts ?? {}) };
    this.secrets = options.apiKey === undefined ? [] : [options.apiKey];
    this.closeTransport = close;
    this.retry = options.retry === false ? undefined : { ...DEFAULT_RETRY, ...(options.retry ?? {}) };
    this.onRetry = options.onRetry;
  }

  /** Is `token` a live session? An invalid one is `{ valid: false, reason }`, not an error. */
  async validate(token: string, call: CallOptions = {}): Promise<Validation> {
    const reply = await this.guard("ValidateSession", [token], () =>
      this.rpc.validateSession({ token }, this.options(call, this.timeouts.validate)),
    );
    return toValidation(reply);
  }

  /**
   * Validates many tokens: one answer per token, in order (duplicates
   * allowed; a malformed token is its own `{ valid: false }`). Sent in slices
   * of 100 (`MAX_BATCH`), each one call with the `validateMany` deadline.
   */
  async validateMany(tokens: readonly string[], call: CallOptions = {}): Promise<Validation[]> {
    const answers: Validation[] = [];
    for (let at = 0; at < tokens.length; at += MAX_BATCH) {
      const part = tokens.slice(at, at + MAX_BATCH);
      const reply = await this.guard("ValidateSessions", part, () =>
        this.rpc.validateSessions({ tokens: part }, this.options(call, this.timeouts.validateMany)),
      );
      if (reply.results.length !== part.length) {
        const message = `ValidateSessions: UNKNOWN: ${reply.results.length} answers for ${part.length} tokens`;
        throw new SessionAuthorityError(message, "UNKNOWN", "ValidateSessions");
      }
      answers.push(...reply.results.map(toValidation));
    }
    return answers;
  }

  /** A new session for `userId`; its token is returned only here. Never retried. */
  async create(userId: string, options: CreateOptions = {}, call: CallOptions = {}): Promise<CreatedSession> {
    const ttl = options.ttl === undefined ? undefined : seconds(options.ttl, "ttl");
    const reply = await this.guard("CreateSession", [], () =>
      this.rpc.createSession(
        { userId, ttl, metadata: { ...(options.metadata ?? {}) } },
        this.options(call, this.timeouts.create),
      ),
    );
    return { token: reply.token, session: toSession(reply.session) };
  }

  /** Revokes one session, by token or session id. Revoking an unknown or revoked one is `revoked: false`. */
  async invalidate(target: InvalidateTarget, call: CallOptions = {}): Promise<Invalidation> {
    const byToken = "token" in target;
    const request = byToken
      ? { target: { case: "token" as const, value: target.token } }
      : { target: { case: "sessionId" as const, value: target.sessionId } };
    const reply = await this.guard("Invalidate", byToken ? [target.token] : [], () =>
      this.rpc.invalidate(request, this.options(call, this.timeouts.invalidate)),
    );
    return { revoked: reply.revoked, cachePurged: reply.cachePurged, propagated: reply.propagated };
  }

  /**
   * Revokes every live session of `userId`, but the one `exceptSessionId`
   * names (a session that is not this user's is INVALID_ARGUMENT, and nothing
   * is revoked).
   */
  async invalidateUser(
    userId: string,
    options: InvalidateUserOptions = {},
    call: CallOptions = {},
  ): Promise<UserInvalidation> {
    const exceptSessionId = options.exceptSessionId ?? "";
    const reply = await this.guard("InvalidateUser", [], () =>
      this.rpc.invalidateUser({ userId, exceptSessionId }, this.options(call, this.timeouts.invalidateUser)),
    );
    return { revokedCount: reply.revokedCount, cachePurged: reply.cachePurged, propagated: reply.propagated };
  }

  /**
   * A user's sessions, oldest first, read from Postgres a page at a time
   * (live ones only unless `includeRevoked`). Never a token.
   */
  listSessions(userId: string, options: ListOptions = {}, call: CallOptions = {}): SessionList {
    const pageSize = options.pageSize ?? 0;
    if (!Number.isInteger(pageSize) || pageSize < 0 || pageSize > 2 ** 31 - 1) {
      throw new RangeError("pageSize: an integer >= 0 (0: the server's default)");
    }
    const includeRevoked = options.includeRevoked ?? false;
    const pages = async function* (this: SessionAuthorityClient): AsyncGenerator<readonly Session[]> {
      let pageToken = "";
      do {
        const request = { userId, includeRevoked, pageSize, pageToken };
        const reply = await this.guard("ListUserSessions", [], () =>
          this.rpc.listUserSessions(request, this.options(call, this.timeouts.listSessions)),
        );
        yield reply.sessions.map(toSession);
        pageToken = reply.nextPageToken;
      } while (pageToken !== "");
    }.bind(this);
    return {
      pages,
      async *[Symbol.asyncIterator]() {
        for await (const page of pages()) yield* page;
      },
    };
  }

  /**
   * Slides a live session's expiry to now + `extendBy` seconds (never
   * earlier, never past its maximum lifetime). Unknown: NotFoundError;
   * revoked or expired: FailedPreconditionError (never revived).
   */
  async touch(target: TouchTarget, call: CallOptions = {}): Promise<Touch> {
    const byToken = "token" in target;
    const extendBy = target.extendBy === undefined ? undefined : seconds(target.extendBy, "extendBy");
    const writeThrough = target.writeThrough === true;
    const request = byToken
      ? { target: { case: "token" as const, value: target.token }, extendBy, writeThrough }
      : { target: { case: "sessionId" as const, value: target.sessionId }, extendBy, writeThrough };
    const reply = await this.guard("TouchSession", byToken ? [target.token] : [], () =>
      this.rpc.touchSession(request, this.options(call, this.timeouts.touch)),
    );
    return toTouch(reply);
  }

  /**
   * Opens a revocation watch; resolves once its START event arrived (within
   * `timeouts.watchStart`, or `call.timeoutMs`). See `RevocationWatch`.
   * `call.signal` closes the watch.
   */
  async watchRevocations(options: WatchOptions = {}, call: CallOptions = {}): Promise<RevocationWatch> {
    const resume = options.resume === false ? undefined : this.retry; // retry: false, no resuming either
    return RevocationWatch.start(
      (after, signal) => this.rpc.watchRevocations({ after }, { signal }),
      {
        startTimeoutMs: call.timeoutMs ?? this.timeouts.watchStart,
        resume,
        onRetry: this.onRetry,
        secrets: this.secrets,
      },
      options.after ?? "",
      call.signal,
    );
  }

  /** The operations health document. "unhealthy" is an answer, not an error. */
  async health(call: CallOptions = {}): Promise<Health> {
    const reply = await this.guard("Health", [], () =>
      this.rpc.health({}, this.options(call, this.timeouts.health)),
    );
    return toHealth(reply);
  }

  /** Closes the connection. */
  close(): void {
    this.closeTransport();
  }

  private options(call: CallOptions, timeoutMs: number): { timeoutMs: number; signal?: AbortSignal } {
    const options: { timeoutMs: number; signal?: AbortSignal } = { timeoutMs: call.timeoutMs ?? timeoutMs };
    if (call.signal !== undefined) options.signal = call.signal;
    return options;
  }

  private async guard<T>(method: string, tokens: readonly string[], run: () => Promise<T>): Promise<T> {
    try {
      return await run();
    } catch (error) {
      throw fromConnectError(error, method, [...tokens, ...this.secrets]);
    }
  }
}

function toValidation(reply: ValidateSessionResponse): Validation {
  const source = toSource(reply.source);
  if (reply.valid) return { valid: true, session: toSession(reply.session), source };
  return { valid: false, reason: toReason(reply.reason), source };
}

function seconds(value: number, name = "ttl"): ReturnType<typeof create<typeof DurationSchema>> {
  if (!Number.isFinite(value) || value < 0) throw new RangeError(`${name}: seconds, a finite number >= 0`);
  const whole = Math.floor(value);
  return create(DurationSchema, { seconds: BigInt(whole), nanos: Math.round((value - whole) * 1e9) });
}
