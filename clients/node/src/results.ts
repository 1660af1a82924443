/** Typed results: plain objects, no generated message types travel past the client. */

import { timestampDate } from "@bufbuild/protobuf/wkt";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import {
  Reason,
  Source,
  type HealthResponse,
  type Session as SessionMessage,
} from "./gen/session_authority/v1/session_authority_pb.js";

/** What the authority knows about a session. Never carries the token. */
export interface Session {
  readonly sessionId: string;
  readonly userId: string;
  readonly createdAt: Date | undefined;
  readonly expiresAt: Date | undefined;
  readonly metadata: Readonly<Record<string, string>>;
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
