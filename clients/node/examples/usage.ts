// The README's usage, run by test/usage.test.ts against a live server.
import { SessionAuthorityClient, UnavailableError } from "@session-authority/client";

const client = new SessionAuthorityClient({ target: process.env.SESSION_AUTHORITY_TARGET ?? "127.0.0.1:50051" });
const { token, session } = await client.create("user-42", { ttl: 3600, metadata: { device: "laptop" } });
const answer = await client.validate(token); // deadline 1 s; retried on UNAVAILABLE
if (answer.valid) console.log("valid", answer.session.userId, answer.session.expiresAt?.toISOString());
await client.invalidate({ sessionId: session.sessionId });
const after = await client.validate(token);
console.log(after.valid ? "still valid?!" : `now ${after.reason}`); // "now revoked"
client.close();
void UnavailableError; // also: InvalidArgumentError, AuthenticationError, DeadlineExceededError, ...
