// The express-session + connect-redis peer of sessiond-bench.
//
// - POST /login with {"user_id": "..."} creates a session holding the user id and answers its
//   cookie (Set-Cookie: connect.sid=...);
// - GET /whoami reads the session named by the Cookie header and answers its user id, or 401
//   when there is none.
//
// Sessions live in Redis under a key prefix of the caller's (--prefix), which the caller
// deletes afterwards. Prints "listening on HOST:PORT" once it accepts connections.
//
//   node server.js [--addr 127.0.0.1:0] [--redis-url redis://127.0.0.1:6379]
//                  [--prefix sdbench-express:] [--session-seconds 3600]

import { parseArgs } from "node:util";
import express from "express";
import session from "express-session";
import { RedisStore } from "connect-redis";
import { createClient } from "redis";

const { values: opts } = parseArgs({
  options: {
    addr: { type: "string", default: "127.0.0.1:0" },
    "redis-url": { type: "string", default: "redis://127.0.0.1:6379" },
    prefix: { type: "string", default: "sdbench-express:" },
    "session-seconds": { type: "string", default: "3600" },
  },
});

const sep = opts.addr.lastIndexOf(":");
const host = opts.addr.slice(0, sep);
const port = Number(opts.addr.slice(sep + 1));
const sessionSeconds = Number(opts["session-seconds"]);

const client = createClient({ url: opts["redis-url"] });
client.on("error", (err) => console.error("redis:", err.message));
await client.connect();

const app = express();
app.disable("x-powered-by");
app.use(express.json());
app.use(
  session({
    store: new RedisStore({ client, prefix: opts.prefix }),
    secret: "sessiond-bench peer secret",
    resave: false,
    saveUninitialized: false,
    cookie: { maxAge: sessionSeconds * 1000 },
  }),
);

app.post("/login", (req, res) => {
  const userId = req.body && req.body.user_id;
  if (typeof userId !== "string") {
    res.status(400).json({ error: "user_id missing" });
    return;
  }
  req.session.userId = userId;
  res.json({ user_id: userId });
});

app.get("/whoami", (req, res) => {
  if (typeof req.session.userId === "string") {
    res.json({ user_id: req.session.userId });
  } else {
    res.status(401).json({ error: "no session" });
  }
});

const server = app.listen(port, host, () => {
  const a = server.address();
  console.log(`listening on ${a.address}:${a.port}`);
});

const stop = () => {
  server.close();
  client.quit().finally(() => process.exit(0));
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
