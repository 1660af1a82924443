// One client per server process (it holds one HTTP/2 connection), built on
// first use from the environment. Server-only: never import this from a
// client component, middleware.ts or an edge route (see README.md).
import { SessionAuthorityClient } from "@session-authority/client";

let client: SessionAuthorityClient | undefined;

export function sessionAuthority(): SessionAuthorityClient {
  client ??= new SessionAuthorityClient({
    target: process.env.SESSION_AUTHORITY_TARGET ?? "127.0.0.1:50051",
    ...(process.env.SESSION_AUTHORITY_CA !== undefined && {
      tls: { ca: process.env.SESSION_AUTHORITY_CA }, // PEM text
    }),
    ...(process.env.SESSION_AUTHORITY_API_KEY !== undefined && {
      apiKey: process.env.SESSION_AUTHORITY_API_KEY,
    }),
  });
  return client;
}
