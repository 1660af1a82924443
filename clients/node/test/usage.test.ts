/** The README's usage (examples/usage.ts) runs as written, against the live server. */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { it } from "node:test";
import { env } from "./support.js";

it("examples/usage.ts: valid, then revoked", async () => {
  const script = fileURLToPath(new URL("../examples/usage.js", import.meta.url));
  const { stdout } = await promisify(execFile)(process.execPath, [script], {
    env: { ...process.env, SESSION_AUTHORITY_TARGET: env("SA_TARGET") },
    timeout: 30_000,
  });
  const lines = stdout.trim().split("\n");
  assert.equal(lines.length, 2, stdout);
  assert.match(lines[0] ?? "", /^valid user-42 \d{4}-\d\d-\d\dT/);
  assert.equal(lines[1], "now revoked");
});
