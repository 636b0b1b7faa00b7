// Drives the official SignalR JavaScript client against our hub. The Rust test
// (crates/signalr/tests/interop_node.rs) reads the lines printed here and restarts the server.
// Usage: node client.mjs <hub url> <token>
import * as signalR from "@microsoft/signalr";

const [url, token] = process.argv.slice(2);
if (!url || !token) {
  console.error("usage: node client.mjs <hub url> <token>");
  process.exit(2);
}

const fail = (msg) => {
  console.log(`FAIL ${msg}`);
  process.exit(1);
};
setTimeout(() => fail("overall timeout"), 60_000).unref();

// Pings are handled inside the client; counting them in the trace log proves they arrive.
let pings = 0;
const logger = {
  log(level, message) {
    if (typeof message === "string" && message.includes('{"type":6}')) pings++;
    if (level >= signalR.LogLevel.Warning) console.error(`[signalr ${level}] ${message}`);
  },
};

const connection = new signalR.HubConnectionBuilder()
  .withUrl(url, {
    accessTokenFactory: () => token,
    transport: signalR.HttpTransportType.WebSockets,
    logMessageContent: true,
  })
  // The default policy gives up after four tries; the test restarts the server within a
  // second or two, so a denser schedule keeps the test short.
  .withAutomaticReconnect([0, 250, 500, 1000, 1000, 1000, 2000, 2000, 2000, 2000, 2000, 2000])
  .configureLogging(logger)
  .build();
connection.serverTimeoutInMilliseconds = 5000;
connection.keepAliveIntervalInMilliseconds = 1000;

// Client result: the server invokes Echo and awaits this return value.
connection.on("Echo", (value) => value);
// After the reconnect the server echoes once more (proving it lists and can invoke the new
// connection) and then sends Finish; the client stays connected until then, since stopping
// earlier would let the test miss the connection between two of its polls.
const finished = new Promise((resolve) => connection.on("Finish", resolve));

const reconnected = new Promise((resolve) => {
  connection.onreconnecting((err) => console.log(`RECONNECTING ${err ? err.message : ""}`));
  connection.onreconnected((id) => {
    console.log(`RECONNECTED ${id}`);
    resolve(id);
  });
});
connection.onclose((err) => console.log(`CLOSED ${err ? err.message : ""}`));

await connection.start();
console.log(`CONNECTED ${connection.connectionId}`);

const sum = await connection.invoke("Add", 2, 3);
if (sum !== 5) fail(`Add returned ${JSON.stringify(sum)}`);
console.log("INVOKE_OK 5");

try {
  await connection.invoke("Fail");
  fail("Fail did not throw");
} catch (e) {
  if (!String(e.message).includes("it failed")) fail(`unexpected error ${e.message}`);
  console.log("INVOKE_ERROR_OK");
}

const deadline = Date.now() + 5000;
while (pings === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
if (pings === 0) fail("no ping received");
console.log(`PINGS ${pings}`);

await reconnected;
const again = await connection.invoke("Add", 20, 22);
if (again !== 42) fail(`Add after reconnect returned ${JSON.stringify(again)}`);
console.log("INVOKE_AFTER_RECONNECT_OK");
await finished;
await connection.stop();
console.log("DONE");
process.exit(0);
