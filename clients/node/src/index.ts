export {
  SessionAuthorityClient,
  DEFAULT_TIMEOUTS,
  IDEMPOTENT,
  type CallOptions,
  type ClientOptions,
  type CreateOptions,
  type InvalidateTarget,
  type Timeouts,
} from "./client.js";
export {
  AuthenticationError,
  DeadlineExceededError,
  InvalidArgumentError,
  PermissionDeniedError,
  RateLimitedError,
  SessionAuthorityError,
  UnavailableError,
  type StatusName,
} from "./errors.js";
export type {
  CreatedSession,
  Health,
  InvalidReason,
  Invalidation,
  Session,
  UserInvalidation,
  Validation,
  ValidationSource,
} from "./results.js";
export { DEFAULT_RETRY, type RetryListener, type RetryPolicy, type TlsOptions } from "./transport.js";
