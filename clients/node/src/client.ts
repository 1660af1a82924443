/**
 * `SessionAuthorityClient`: one typed method per RPC. Each method is the same
 * four steps (build the request, call with the method's deadline, map errors,
 * map the answer), so a new RPC is one small method, one line in `TIMEOUTS`
 * and, when it is idempotent, one name in `IDEMPOTENT`.
 */

import { createClient, type Client } from "@connectrpc/connect";
import { create } from "@bufbuild/protobuf";
import { DurationSchema } from "@bufbuild/protobuf/wkt";
import { SessionAuthority } from "./gen/session_authority/v1/session_authority_pb.js";
import { fromConnectError } from "./errors.js";
import {
  toHealth,
  toReason,
  toSession,
  toSource,
  type CreatedSession,
  type Health,
  type Invalidation,
  type UserInvalidation,
  type Validation,
} from "./results.js";
import { buildTransport, type TransportOptions } from "./transport.js";

/** Deadlines per method, in milliseconds. Every call has one. */
export interface Timeouts {
  readonly validate: number;
  readonly create: number;
  readonly invalidate: number;
  readonly invalidateUser: number;
  readonly health: number;
}

export const DEFAULT_TIMEOUTS: Timeouts = {
  validate: 1000,
  create: 3000,
  invalidate: 3000,
  invalidateUser: 5000,
  health: 2000,
};

/**
 * RPCs retried on UNAVAILABLE. CreateSession is not: a retry after a lost
 * answer would issue a second session.
 */
export const IDEMPOTENT: ReadonlySet<string> = new Set([
  "ValidateSession",
  "Invalidate",
  "InvalidateUser",
  "Health",
]);

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

export class SessionAuthorityClient {
  private readonly rpc: Client<typeof SessionAuthority>;
  private readonly timeouts: Timeouts;
  private readonly secrets: readonly string[];
  private readonly closeTransport: () => void;

  constructor(options: ClientOptions) {
    const { transport, close } = buildTransport(options, IDEMPOTENT);
    this.rpc = createClient(SessionAuthority, transport);
    this.timeouts = { ...DEFAULT_TIMEOUTS, ...(options.timeouts ?? {}) };
    this.secrets = options.apiKey === undefined ? [] : [options.apiKey];
    this.closeTransport = close;
  }

  /** Is `token` a live session? An invalid one is `{ valid: false, reason }`, not an error. */
  async validate(token: string, call: CallOptions = {}): Promise<Validation> {
    const reply = await this.guard("ValidateSession", [token], () =>
      this.rpc.validateSession({ token }, this.options(call, this.timeouts.validate)),
    );
    const source = toSource(reply.source);
    if (reply.valid) return { valid: true, session: toSession(reply.session), source };
    return { valid: false, reason: toReason(reply.reason), source };
  }

  /** A new session for `userId`; its token is returned only here. Never retried. */
  async create(userId: string, options: CreateOptions = {}, call: CallOptions = {}): Promise<CreatedSession> {
    const ttl = options.ttl === undefined ? undefined : seconds(options.ttl);
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

  /** Revokes every live session of `userId`. */
  async invalidateUser(userId: string, call: CallOptions = {}): Promise<UserInvalidation> {
    const reply = await this.guard("InvalidateUser", [], () =>
      this.rpc.invalidateUser({ userId }, this.options(call, this.timeouts.invalidateUser)),
    );
    return { revokedCount: reply.revokedCount, cachePurged: reply.cachePurged, propagated: reply.propagated };
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

function seconds(value: number): ReturnType<typeof create<typeof DurationSchema>> {
  if (!Number.isFinite(value) || value < 0) throw new RangeError("ttl: seconds, a finite number >= 0");
  const whole = Math.floor(value);
  return create(DurationSchema, { seconds: BigInt(whole), nanos: Math.round((value - whole) * 1e9) });
}
