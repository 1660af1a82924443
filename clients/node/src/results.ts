/** Typed results: plain objects, no generated message types travel past the client. */

import { timestampDate } from "@bufbuild/protobuf/wkt";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import {
  Reason,
  RevocationEventKind,
  RevocationReason as RevocationReasonNumber,
  Source,
  type HealthResponse,
  type RevocationEvent as RevocationEventMessage,
  type Session as SessionMessage,
  type TouchSessionResponse,
} from "./gen/session_authority/v1/session_authority_pb.js";

/** What the authority knows about a session. Never carries the token. */
export interface Session {
  readonly sessionId: string;
  readonly userId: string;
  readonly createdAt: Date | undefined;
  readonly expiresAt: Date | undefined;
  readonly metadata: Readonly<Record<string, string>>;
  /** When the session was last touched (`touch`), when the server knows it. */
  readonly lastSeenAt: Date | undefined;
  /** Set on a revoked session (`listSessions(userId, { includeRevoked: true })`). */
  readonly revokedAt: Date | undefined;
}

/** Which tier answered: the Redis cache, Postgres, or the token's format alone. */
export type ValidationSource = "cache" | "database" | "token_format" | "unspecified";
/** Why a session is not valid. */
export type InvalidReason = "unknown" | "expired" | "revoked" | "unspecified";

/** `validate`'s answer: an invalid session is a normal result, not an error. */
export type Validation =
  | { readonly valid: true; readonly session: Session; readonly source: ValidationSource }
  | { readonly valid: false; readonly reason: InvalidReason; readonly source: ValidationSource };

export interface CreatedSession {
  /** The bearer token, returned only here: store it as a secret (an HttpOnly cookie). */
  readonly token: string;
  readonly session: Session;
}

export interface Invalidation {
  /** True when a live session was revoked by this call (see the README on retries). */
  readonly revoked: boolean;
  /** False: durable in Postgres, the cache purge is re-applied when Redis is back. */
  readonly cachePurged: boolean;
  /** False: some replica's in-process copies expire within L1_CACHE_TTL_MS instead. */
  readonly propagated: boolean;
}

export interface UserInvalidation {
  readonly revokedCount: number;
  readonly cachePurged: boolean;
  readonly propagated: boolean;
}

/** `touch`'s answer: the session as it stands after the call. */
export interface Touch {
  readonly session: Session;
  /** True: this call wrote the new expiry to Postgres; false: coalesced with a write within TOUCH_INTERVAL. */
  readonly written: boolean;
}

/**
 * What a `RevocationEvent` carries: "start" (the first event of every stream,
 * only `cursor` set), "revoked" (one session), or the lower-cased name of a
 * kind added to the proto later ("unknown" when even the generated code does
 * not know it). Consumers must ignore kinds they do not know.
 */
export type RevocationEventKindName = "start" | "revoked" | "unspecified" | (string & {});
/** Who or what revoked a session. */
export type RevocationReason = "explicit" | "user_wide" | "expired" | "admin" | "unspecified";

/** One event of `watchRevocations`. Never carries a token or a token hash. */
export interface RevocationEvent {
  readonly kind: RevocationEventKindName;
  /** The kind's number on the wire (for kinds newer than this client). */
  readonly kindNumber: number;
  /** Resume after this event with `watchRevocations({ after: cursor })`, on any replica. */
  readonly cursor: string;
  /** The revoked session ("revoked" only). */
  readonly sessionId: string;
  readonly userId: string;
  readonly reason: RevocationReason;
  /** Postgres's number for the event (unique; the stream's order is the cursor's, not this). */
  readonly sequence: bigint;
  readonly revokedAt: Date | undefined;
}

export interface Health {
  /** "healthy", "degraded" (Redis down, Postgres serving) or "unhealthy". */
  readonly status: string;
  readonly errors: readonly string[];
  readonly timestamp: Date | undefined;
  /** The whole document, as generated (its JSON form is the runbook's health document). */
  readonly document: HealthResponse;
}

function date(ts: Timestamp | undefined): Date | undefined {
  return ts === undefined ? undefined : timestampDate(ts);
}

export function toSession(message: SessionMessage | undefined): Session {
  return {
    sessionId: message?.sessionId ?? "",
    userId: message?.userId ?? "",
    createdAt: date(message?.createdAt),
    expiresAt: date(message?.expiresAt),
    metadata: { ...(message?.metadata ?? {}) },
    lastSeenAt: date(message?.lastSeenAt),
    revokedAt: date(message?.revokedAt),
  };
}

export function toTouch(reply: TouchSessionResponse): Touch {
  return { session: toSession(reply.session), written: reply.written };
}

const REVOCATION_REASONS: Partial<Record<number, RevocationReason>> = {
  [RevocationReasonNumber.EXPLICIT]: "explicit",
  [RevocationReasonNumber.USER_WIDE]: "user_wide",
  [RevocationReasonNumber.EXPIRED]: "expired",
  [RevocationReasonNumber.ADMIN]: "admin",
};

/**
 * The kind's name from the generated enum's reverse mapping, so that a kind
 * added to the proto (and regenerated) gets its name without a change here,
 * and one newer than the generated code is "unknown", never an error.
 */
function kindName(kind: number): RevocationEventKindName {
  const name: unknown = (RevocationEventKind as unknown as Record<number, unknown>)[kind];
  return typeof name === "string" ? name.toLowerCase() : "unknown";
}

export function toRevocationEvent(message: RevocationEventMessage): RevocationEvent {
  return {
    kind: kindName(message.kind),
    kindNumber: message.kind,
    cursor: message.cursor,
    sessionId: message.sessionId,
    userId: message.userId,
    reason: REVOCATION_REASONS[message.reason] ?? "unspecified",
    sequence: message.sequence,
    revokedAt: date(message.revokedAt),
  };
}

const SOURCES: Record<Source, ValidationSource> = {
  [Source.UNSPECIFIED]: "unspecified",
  [Source.CACHE]: "cache",
  [Source.DATABASE]: "database",
  [Source.TOKEN_FORMAT]: "token_format",
};
const REASONS: Record<Reason, InvalidReason> = {
  [Reason.UNSPECIFIED]: "unspecified",
  [Reason.UNKNOWN]: "unknown",
  [Reason.EXPIRED]: "expired",
  [Reason.REVOKED]: "revoked",
};

export function toSource(source: Source): ValidationSource {
  return SOURCES[source] ?? "unspecified";
}

export function toReason(reason: Reason): InvalidReason {
  return REASONS[reason] ?? "unspecified";
}

export function toHealth(document: HealthResponse): Health {
  return {
    status: document.status ?? "",
    errors: [...document.errors],
    timestamp: date(document.timestamp),
    document,
  };
}
