// GET /api/me: who is the caller, from the `session` cookie.
//
// Node runtime only. gRPC needs HTTP/2 with trailers, which neither the edge
// runtime nor Next.js middleware has (grpc/grpc-node#2364,
// connectrpc/connect-es#749). There, call a Node route handler like this one,
// or the service's HTTP forward-auth endpoint (FORWARD_AUTH_PORT: 200 with
// identity headers, 401 otherwise).
import { SessionAuthorityError } from "@session-authority/client";
import { sessionAuthority } from "../../../lib/session-authority";

export const runtime = "nodejs";
export const dynamic = "force-dynamic"; // per request: never cache an identity

const COOKIE = "session";

function cookie(request: Request, name: string): string | undefined {
  for (const part of (request.headers.get("cookie") ?? "").split(";")) {
    const at = part.indexOf("=");
    if (at > 0 && part.slice(0, at).trim() === name) return decodeURIComponent(part.slice(at + 1).trim());
  }
  return undefined;
}

export async function GET(request: Request): Promise<Response> {
  const token = cookie(request, COOKIE);
  if (token === undefined) return Response.json({ error: "not signed in" }, { status: 401 });
  try {
    const answer = await sessionAuthority().validate(token); // 1 s deadline, retried on UNAVAILABLE
    if (!answer.valid) return Response.json({ error: `session ${answer.reason}` }, { status: 401 });
    const { userId, sessionId, expiresAt } = answer.session;
    return Response.json({ userId, sessionId, expiresAt });
  } catch (error) {
    // Fail closed: the service could not say (down, slow, misconfigured). Never
    // treat that as signed in; and never log the token (the error has none).
    const code = error instanceof SessionAuthorityError ? error.code : "UNKNOWN";
    console.error("session check failed", code);
    return Response.json({ error: "session service unavailable" }, { status: 503 });
  }
}
