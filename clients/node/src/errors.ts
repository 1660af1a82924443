/**
 * Errors of the session authority client, mapped from gRPC status codes in one
 * place (`fromConnectError`). An invalid session is NOT an error: `validate`
 * answers `{ valid: false, reason }`.
 *
 *   SessionAuthorityError            any failed call (`code`: the gRPC status name)
 *   ├── InvalidArgumentError         INVALID_ARGUMENT: bad input; the message names the field
 *   ├── AuthenticationError          UNAUTHENTICATED: no or a wrong API key / client certificate
 *   ├── PermissionDeniedError        PERMISSION_DENIED: this caller may not call this method
 *   ├── RateLimitedError             RESOURCE_EXHAUSTED: slow down; never read it as "invalid"
 *   ├── DeadlineExceededError        DEADLINE_EXCEEDED: no answer within the call's deadline
 *   ├── UnavailableError             UNAVAILABLE: the service cannot answer now (retries spent)
 *   ├── NotFoundError                NOT_FOUND: `touch` of a session that does not exist
 *   └── FailedPreconditionError      FAILED_PRECONDITION: `touch` of a revoked or expired session;
 *                                    a watch's cursor too old (drop what you cached, watch from now)
 *
 * Fail closed: every error means "the service could not say". A caller that
 * gates access on `validate` must deny (or show an error) on any of them, never
 * treat the session as valid.
 *
 * Messages never carry a token: the server never echoes one, and this module
 * redacts anything token-shaped (and the exact tokens of the call) from the
 * message it is given, as a second line of defence.
 */

import { Code, ConnectError } from "@connectrpc/connect";

export type StatusName =
  | "CANCELLED"
  | "UNKNOWN"
  | "INVALID_ARGUMENT"
  | "DEADLINE_EXCEEDED"
  | "NOT_FOUND"
  | "ALREADY_EXISTS"
  | "PERMISSION_DENIED"
  | "RESOURCE_EXHAUSTED"
  | "FAILED_PRECONDITION"
  | "ABORTED"
  | "OUT_OF_RANGE"
  | "UNIMPLEMENTED"
  | "INTERNAL"
  | "UNAVAILABLE"
  | "DATA_LOSS"
  | "UNAUTHENTICATED";

const NAMES: Record<Code, StatusName> = {
  [Code.Canceled]: "CANCELLED",
  [Code.Unknown]: "UNKNOWN",
  [Code.InvalidArgument]: "INVALID_ARGUMENT",
  [Code.DeadlineExceeded]: "DEADLINE_EXCEEDED",
  [Code.NotFound]: "NOT_FOUND",
  [Code.AlreadyExists]: "ALREADY_EXISTS",
  [Code.PermissionDenied]: "PERMISSION_DENIED",
  [Code.ResourceExhausted]: "RESOURCE_EXHAUSTED",
  [Code.FailedPrecondition]: "FAILED_PRECONDITION",
  [Code.Aborted]: "ABORTED",
  [Code.OutOfRange]: "OUT_OF_RANGE",
  [Code.Unimplemented]: "UNIMPLEMENTED",
  [Code.Internal]: "INTERNAL",
  [Code.Unavailable]: "UNAVAILABLE",
  [Code.DataLoss]: "DATA_LOSS",
  [Code.Unauthenticated]: "UNAUTHENTICATED",
};

/** Any failed call. `code` is the gRPC status name, `method` the RPC. */
export class SessionAuthorityError extends Error {
  override readonly name: string = "SessionAuthorityError";
  constructor(
    message: string,
    readonly code: StatusName,
    readonly method: string,
  ) {
    super(message);
  }
}

export class InvalidArgumentError extends SessionAuthorityError {
  override readonly name = "InvalidArgumentError";
}
export class AuthenticationError extends SessionAuthorityError {
  override readonly name = "AuthenticationError";
}
export class PermissionDeniedError extends SessionAuthorityError {
  override readonly name = "PermissionDeniedError";
}
export class RateLimitedError extends SessionAuthorityError {
  override readonly name = "RateLimitedError";
}
export class DeadlineExceededError extends SessionAuthorityError {
  override readonly name = "DeadlineExceededError";
}
export class UnavailableError extends SessionAuthorityError {
  override readonly name = "UnavailableError";
}
export class NotFoundError extends SessionAuthorityError {
  override readonly name = "NotFoundError";
}
export class FailedPreconditionError extends SessionAuthorityError {
  override readonly name = "FailedPreconditionError";
}

type ErrorClass = new (message: string, code: StatusName, method: string) => SessionAuthorityError;

/** The one table from a status code to its class; a code not here is the base class. */
const CLASS_FOR: Partial<Record<Code, ErrorClass>> = {
  [Code.InvalidArgument]: InvalidArgumentError,
  [Code.Unauthenticated]: AuthenticationError,
  [Code.PermissionDenied]: PermissionDeniedError,
  [Code.ResourceExhausted]: RateLimitedError,
  [Code.DeadlineExceeded]: DeadlineExceededError,
  [Code.Unavailable]: UnavailableError,
  [Code.NotFound]: NotFoundError,
  [Code.FailedPrecondition]: FailedPreconditionError,
};

// The service's tokens: "sat_" and 48 URL-safe characters. Redacted whatever
// their length, and so is any long opaque run that follows "sat_".
const TOKEN_SHAPE = /sat_[A-Za-z0-9_-]+/g;

/** `text` with token-shaped strings and each of `secrets` replaced by "[redacted]". */
export function redact(text: string, secrets: readonly string[] = []): string {
  let out = text;
  for (const secret of secrets) {
    if (secret.length > 0) out = out.split(secret).join("[redacted]");
  }
  return out.replace(TOKEN_SHAPE, "[redacted]");
}

/**
 * Maps what a call threw to our hierarchy. `secrets` are the tokens the call
 * carried: never in the message. The original error is not kept as `cause`
 * (its message is the unredacted one).
 */
export function fromConnectError(
  error: unknown,
  method: string,
  secrets: readonly string[] = [],
): SessionAuthorityError {
  if (error instanceof SessionAuthorityError) return error;
  const connect = ConnectError.from(error);
  const code = connect.code;
  const Class = CLASS_FOR[code] ?? SessionAuthorityError;
  const detail = redact(connect.rawMessage, secrets);
  return new Class(`${method}: ${NAMES[code]}: ${detail}`, NAMES[code], method);
}
