#!/usr/bin/env node
// A Node.js client of the har.v1 API, written the way a user in another language would:
// load the .proto at run time (@grpc/proto-loader), call Classes and Predict (@grpc/grpc-js).
//
//   node client.js HOST:PORT IMAGE [IMAGE...] [--top-k N] [--token T]
//
// Prints one JSON object: {"classes": {...}, "predict": {...}} on success, or, with exit code 2
// on a gRPC error, {"error": {"code": "INVALID_ARGUMENT", "details": "...", "reason": ...,
// "field_violations": [...], "retry_delay_s": ...}}: the status details decoded from the
// grpc-status-details-bin trailer (a google.rpc.Status holding ErrorInfo, BadRequest, RetryInfo).
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "protos");
// google/rpc/{status,error_details}.proto from googleapis (see googleapis/SOURCE.md).
const GOOGLEAPIS = path.join(__dirname, "googleapis");

function loadStatusTypes() {
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) =>
    fs.existsSync(path.join(GOOGLEAPIS, target))
      ? path.join(GOOGLEAPIS, target)
      : protobuf.util.path.resolve(origin, target); // google/protobuf/*: bundled
  root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"]);
  return root;
}

// The rich error model: what the server put in the grpc-status-details-bin trailer.
function statusDetails(err) {
  const out = {};
  const raw = err.metadata && err.metadata.get("grpc-status-details-bin")[0];
  if (!raw) return out;
  const root = loadStatusTypes();
  const status = root.lookupType("google.rpc.Status").decode(raw);
  for (const any of status.details) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
    const message = root.lookupType(typeName).decode(any.value);
    if (typeName === "google.rpc.ErrorInfo") {
      out.reason = message.reason;
      out.domain = message.domain;
    } else if (typeName === "google.rpc.BadRequest") {
      out.field_violations = message.fieldViolations.map((v) => ({
        field: v.field,
        description: v.description,
      }));
    } else if (typeName === "google.rpc.RetryInfo") {
      const d = message.retryDelay;
      out.retry_delay_s = Number(d.seconds || 0) + (d.nanos || 0) / 1e9;
    }
  }
  return out;
}

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
  // No message size options: gRPC sends any size by default (the server's limit is 16 MiB),
  // and replies are small.
  const client = new har.ActionRecognition(args.target, grpc.credentials.createInsecure());
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
    console.log(JSON.stringify({ error: { code, details: err.details, ...statusDetails(err) } }));
    process.exitCode = 2;
  } finally {
    client.close();
  }
}

main();
