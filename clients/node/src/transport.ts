/**
 * The transport: gRPC over HTTP/2 (Connect-ES v2's `createGrpcTransport`),
 * with TLS options, the API key as call metadata, and retries of idempotent
 * calls on UNAVAILABLE, written as an interceptor (Connect-ES has no
 * service-config retries; this one follows gRPC's retryPolicy semantics:
 * bounded attempts, exponential backoff with full jitter, UNAVAILABLE only).
 */

import { Code, ConnectError, type Interceptor, type Transport } from "@connectrpc/connect";
import { Http2SessionManager, createGrpcTransport } from "@connectrpc/connect-node";

export interface TlsOptions {
  /** PEM of the CA(s) that signed the server's certificate; default: Node's trust store. */
  readonly ca?: string | Buffer;
  /** PEM client certificate chain and key, for mTLS. */
  readonly cert?: string | Buffer;
  readonly key?: string | Buffer;
  /** The name the server's certificate must carry, when it differs from the target's host. */
  readonly servername?: string;
}

/** gRPC retryPolicy's knobs. Retries happen inside the call's deadline, never past it. */
export interface RetryPolicy {
  /** Attempts in all, the first included (1: no retries). */
  readonly maxAttempts: number;
  readonly initialBackoffMs: number;
  readonly maxBackoffMs: number;
  readonly backoffMultiplier: number;
}

export const DEFAULT_RETRY: RetryPolicy = {
  maxAttempts: 4,
  initialBackoffMs: 100,
  maxBackoffMs: 1000,
  backoffMultiplier: 2,
};

/** Told before each retry (for logs and metrics); carries no token. */
export type RetryListener = (event: { method: string; attempt: number; code: string }) => void;

export interface TransportOptions {
  /** "host:port", or a URL ("http://host:port", "https://host:port"). */
  readonly target: string;
  /** TLS to the server: true (Node's trust store) or the CA and client certificate. */
  readonly tls?: boolean | TlsOptions;
  /** Sent as "authorization: Bearer <key>" on every call. Needs `tls` (see allowPlaintextApiKey). */
  readonly apiKey?: string;
  /** Send the API key without TLS (a loopback sidecar only). Default false: refused. */
  readonly allowPlaintextApiKey?: boolean;
  /** Retries of idempotent calls on UNAVAILABLE; false: none. */
  readonly retry?: Partial<RetryPolicy> | false;
  readonly onRetry?: RetryListener;
}

function baseUrl(target: string, tls: boolean): string {
  if (/^https?:\/\//.test(target)) {
    if (target.startsWith("http://") && tls) {
      throw new TypeError("target is http:// but TLS options are set: use https://host:port");
    }
    return target;
  }
  return `${tls ? "https" : "http"}://${target}`;
}

/** Sets the API key on every call. */
export function apiKeyInterceptor(key: string): Interceptor {
  const value = `Bearer ${key}`;
  return (next) => (req) => {
    req.header.set("authorization", value);
    return next(req);
  };
}

export function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

/**
 * Retries a unary call whose method is in `idempotent` when it ends
 * UNAVAILABLE, at most `policy.maxAttempts` attempts, and only while the call's
 * deadline leaves room for the backoff (the deadline covers every attempt; each
 * retry sends the time left as its grpc-timeout).
 */
export function retryInterceptor(
  policy: RetryPolicy,
  idempotent: ReadonlySet<string>,
  onRetry?: RetryListener,
): Interceptor {
  return (next) => async (req) => {
    if (req.stream || !idempotent.has(req.method.name)) return next(req);
    const started = Date.now();
    const timeout = /^(\d+)m$/.exec(req.header.get("grpc-timeout") ?? "");
    const budgetMs = timeout?.[1] === undefined ? undefined : Number(timeout[1]);
    let backoff = policy.initialBackoffMs;
    for (let attempt = 1; ; attempt++) {
      try {
        return await next(req);
      } catch (error) {
        if (ConnectError.from(error).code !== Code.Unavailable) throw error;
        if (attempt >= policy.maxAttempts || req.signal.aborted) throw error;
        const wait = Math.random() * backoff;
        if (budgetMs !== undefined && Date.now() - started + wait >= budgetMs) throw error;
        onRetry?.({ method: req.method.name, attempt, code: "UNAVAILABLE" });
        await sleep(wait, req.signal);
        backoff = Math.min(backoff * policy.backoffMultiplier, policy.maxBackoffMs);
        if (budgetMs !== undefined) {
          const left = Math.max(1, budgetMs - (Date.now() - started));
          req.header.set("grpc-timeout", `${left}m`);
        }
      }
    }
  };
}

/**
 * A connection lost under a call (reset, closed, a failed TLS handshake) ends
 * its HTTP/2 stream with CANCEL, which Connect reports as CANCELLED, or fails
 * with ECONNRESET, which Connect reports as ABORTED (a server's reading of a
 * client hanging up). Unless the caller cancelled (or the deadline passed),
 * either is gRPC's UNAVAILABLE, as grpc-js reports it: the server could not be
 * reached. An ABORTED status sent by a server (no local cause) is left alone.
 * Innermost, so that the retries see it.
 */
export function connectionLossInterceptor(): Interceptor {
  return (next) => async (req) => {
    try {
      return await next(req);
    } catch (error) {
      throw asConnectionLoss(error, req.signal.aborted);
    }
  };
}

/**
 * The rule above for one error: UNAVAILABLE for a lost connection, unless the
 * call was aborted on our side (`aborted`); anything else as it was. Streams
 * need it too: their errors arrive while reading, past the interceptor.
 */
export function asConnectionLoss(error: unknown, aborted: boolean): unknown {
  const connect = ConnectError.from(error);
  const local = connect.code === Code.Canceled || (connect.code === Code.Aborted && connect.cause !== undefined);
  if (!local || aborted) return error;
  return new ConnectError(`connection lost: ${connect.rawMessage}`, Code.Unavailable);
}

export interface BuiltTransport {
  readonly transport: Transport;
  /** Closes the HTTP/2 connection; calls after it fail. */
  readonly close: () => void;
}

export function buildTransport(options: TransportOptions, idempotent: ReadonlySet<string>): BuiltTransport {
  const tls = options.tls === undefined || options.tls === false ? undefined : options.tls === true ? {} : options.tls;
  const url = baseUrl(options.target, tls !== undefined || options.target.startsWith("https://"));
  const secure = url.startsWith("https://");
  if (options.apiKey !== undefined && !secure && options.allowPlaintextApiKey !== true) {
    throw new TypeError(
      "apiKey without TLS would send the key in clear text: set tls (or allowPlaintextApiKey on loopback)",
    );
  }
  if ((tls?.cert === undefined) !== (tls?.key === undefined)) {
    throw new TypeError("tls.cert and tls.key go together (mTLS)");
  }
  const interceptors: Interceptor[] = [];
  if (options.retry !== false) {
    const policy = { ...DEFAULT_RETRY, ...(options.retry ?? {}) };
    interceptors.push(retryInterceptor(policy, idempotent, options.onRetry));
  }
  if (options.apiKey !== undefined) interceptors.push(apiKeyInterceptor(options.apiKey));
  interceptors.push(connectionLossInterceptor());
  const nodeOptions = tls === undefined ? {} : { ...tls };
  // Keepalive matched to the server's ping policy (bootstrap/grpc_server.py): it accepts a PING
  // every 10 s at most and only while a call is open. One every 30 s during calls (a long watch)
  // notices a dead connection; none on an idle one (a strike on the server).
  const sessionManager = new Http2SessionManager(
    url,
    { pingIntervalMs: 30_000, pingTimeoutMs: 15_000, pingIdleConnection: false },
    nodeOptions,
  );
  const transport = createGrpcTransport({ baseUrl: url, sessionManager, nodeOptions, interceptors });
  return { transport, close: () => sessionManager.abort() };
}
