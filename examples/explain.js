#!/usr/bin/env node
// Explain images with fdcam's exported explainer graph from Node.js, no Python involved.
//
//   node explain.js DIR/explainer.onnx IMAGES.f32 OUT_PREFIX [--classes 340,1]
//
// IMAGES.f32: raw little-endian float32 tensor [N,3,H,W], normalised as the model expects (mean/std
// and H,W are in DIR/explainer.json). With a graph exported with --classes-input, --classes gives T
// classes per image (the same T for every image). Writes OUT_PREFIX.saliency.f32 (float32 [N,T,H,W]),
// OUT_PREFIX.json (targets, top-1 logit) and one grey-level OUT_PREFIX.<n>.<t>.pgm per map.
"use strict";

const fs = require("fs");
const path = require("path");
const ort = require("onnxruntime-node");

function fail(message) {
  console.error(`explain.js: error: ${message}`);
  process.exit(2);
}

async function main(argv) {
  const [modelPath, imagesPath, outPrefix, ...rest] = argv;
  if (!modelPath || !imagesPath || !outPrefix) fail("usage: node explain.js explainer.onnx images.f32 out_prefix [--classes 1,2]");
  const description = JSON.parse(fs.readFileSync(modelPath.replace(/\.onnx$/, ".json"), "utf8"));
  const [height, width] = description.input_size.split("x").map(Number);

  const bytes = fs.readFileSync(imagesPath);
  const perImage = 3 * height * width;
  if (bytes.length % (4 * perImage) !== 0) fail(`${imagesPath} does not hold float32 images of 3x${height}x${width}`);
  const n = bytes.length / (4 * perImage);
  const pixels = new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length));
  const feeds = { image: new ort.Tensor("float32", pixels, [n, 3, height, width]) };

  const classesAt = rest.indexOf("--classes");
  if (classesAt >= 0) {
    if (description.classes_input !== true) fail("this graph was exported without --classes-input");
    const classes = rest[classesAt + 1].split(",").map((c) => BigInt(parseInt(c, 10)));
    const all = [];
    for (let i = 0; i < n; i++) all.push(...classes);
    feeds.classes = new ort.Tensor("int64", BigInt64Array.from(all), [n, classes.length]);
  } else if (description.classes_input === true) {
    fail("this graph needs --classes");
  }

  const session = await ort.InferenceSession.create(modelPath, { executionProviders: ["cpu"] });
  const { logits, targets, saliency } = await session.run(feeds);
  const t = saliency.dims[1];

  fs.writeFileSync(`${outPrefix}.saliency.f32`, Buffer.from(saliency.data.buffer, saliency.data.byteOffset, saliency.data.byteLength));
  const numClasses = logits.dims[1];
  const summary = [];
  for (let i = 0; i < n; i++) {
    const row = logits.data.subarray(i * numClasses, (i + 1) * numClasses);
    let top = 0;
    for (let c = 1; c < numClasses; c++) if (row[c] > row[top]) top = c;
    const explained = Array.from(targets.data.subarray(i * t, (i + 1) * t), Number);
    summary.push({ top1: top, top1_logit: row[top], targets: explained });
    for (let j = 0; j < t; j++) {
      const map = saliency.data.subarray((i * t + j) * height * width, (i * t + j + 1) * height * width);
      const grey = Buffer.from(Array.from(map, (v) => Math.round(255 * v)));
      fs.writeFileSync(`${outPrefix}.${i}.${j}.pgm`, Buffer.concat([Buffer.from(`P5\n${width} ${height}\n255\n`), grey]));
    }
  }
  fs.writeFileSync(`${outPrefix}.json`, JSON.stringify({ shape: saliency.dims, images: summary }, null, 2) + "\n");
  console.log(`${path.resolve(outPrefix)}.saliency.f32 [${saliency.dims.join(",")}]`);
}

main(process.argv.slice(2)).catch((error) => fail(String(error.message || error).split("\n")[0]));
