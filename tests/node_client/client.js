#!/usr/bin/env node
// A Node.js client of the har.v1 API, written the way a user in another language would:
// load the .proto at run time (@grpc/proto-loader), call Classes and Predict (@grpc/grpc-js).
//
//   node client.js HOST:PORT IMAGE [IMAGE...] [--top-k N] [--token T]
//
// Prints one JSON object: {"classes": {...}, "predict": {...}} on success, or
// {"error": {"code": "INVALID_ARGUMENT", "details": "..."}} and exit code 2 on a gRPC error.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "protos");

function parseArgs(argv) {
  const args = { images: [], topK: 0, token: null };
  const rest = argv.slice(2);
  for (let i = 0; i < rest.length; i++) {
    if (rest[i] === "--top-k") args.topK = parseInt(rest[++i], 10);
    else if (rest[i] === "--token") args.token = rest[++i];
    else if (!args.target) args.target = rest[i];
    else args.images.push(rest[i]);
  }
  if (!args.target || args.images.length === 0) {
    console.error("usage: node client.js HOST:PORT IMAGE [IMAGE...] [--top-k N] [--token T]");
    process.exit(64);
  }
  return args;
}

function call(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 60_000);
    client[method](request, metadata, { deadline }, (err, reply) =>
      err ? reject(err) : resolve(reply)
    );
  });
}

async function main() {
  const args = parseArgs(process.argv);
  const definition = protoLoader.loadSync("har/v1/har.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names exactly as in the .proto: top_k, all_predictions
    longs: String,
    enums: String,
    defaults: true,
  });
  const har = grpc.loadPackageDefinition(definition).har.v1;
  const client = new har.ActionRecognition(args.target, grpc.credentials.createInsecure(), {
    "grpc.max_send_message_length": 64 * 1024 * 1024,
  });
  const metadata = new grpc.Metadata();
  if (args.token) metadata.set("authorization", `Bearer ${args.token}`);
  try {
    const classes = await call(client, "Classes", {}, metadata);
    const predict = await call(
      client,
      "Predict",
      { images: args.images.map((f) => fs.readFileSync(f)), top_k: args.topK },
      metadata
    );
    console.log(JSON.stringify({ classes, predict }));
  } catch (err) {
    const code = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code);
    console.log(JSON.stringify({ error: { code, details: err.details } }));
    process.exitCode = 2;
  } finally {
    client.close();
  }
}

main();
