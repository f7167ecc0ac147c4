#!/usr/bin/env node
// Explain photos with fdcam's exported explainer graph from Node.js, no Python involved.
//
//   node explain.js DIR/explainer.onnx PHOTO.jpg|PHOTO.png ... OUT_PREFIX [--classes 340,1]
//   node explain.js DIR/explainer.onnx IMAGES.f32 OUT_PREFIX [--classes 340,1]
//   node explain.js DIR/explainer.onnx IMAGES.f32|PHOTO ... OUT_PREFIX --classes 15,7 --region REGIONS.f32
//
// Photos (JPEG or PNG) are decoded here (jpeg-js, pngjs: pure JavaScript), resized to the graph's input size
// the way fdcam's Python preprocessing does (Pillow's bilinear filter, 8-bit, with its antialiasing when
// shrinking), scaled to [0,1] and normalised with explainer.json's mean and std. IMAGES.f32 instead is a raw
// little-endian float32 tensor [N,3,H,W], already normalised. With a graph exported with --classes-input,
// --classes gives T classes per image (the same T for every image); without it the graph explains the top-1 class.
// A region graph (exported with --target region: a segmentation model) also needs --region REGIONS.f32, a raw
// little-endian float32 tensor [N,T,h,w] (h,w: explainer.json's region_size), one mask per image and class:
// row (n,t) explains the sum of class t's logits over mask (n,t); its `logits` are the output map's pixel means.
//
// Writes (the folder of OUT_PREFIX is created): OUT_PREFIX.saliency.f32 (float32 [N,T,H,W]), OUT_PREFIX.json
// (per image: its file, targets, top-1 class and logit), a grey-level OUT_PREFIX.<n>.<t>.pgm per map and, for
// photos, OUT_PREFIX.<n>.<t>.png: the map as a JET overlay on the photo at its own size, as `fdcam explain` draws it.
// EXIF orientation is not applied (Python's loader applies it): rotate such photos first.
"use strict";

const fs = require("fs");
const path = require("path");

function fail(message) {
  console.error(`explain.js: error: ${message}`);
  process.exit(2);
}

// --- explainer.json: older exports store every value as a string ("true", "1000", "224x224") -------------------

function flag(value) {
  return value === true || value === "true";
}

function inputSize(value) {
  const [height, width] = (Array.isArray(value) ? value : String(value).split("x")).map(Number);
  if (!(height > 0 && width > 0)) fail(`explainer.json has no usable input_size: ${JSON.stringify(value)}`);
  return [height, width];
}

function numbers(value, name) {
  const list = (typeof value === "string" ? JSON.parse(value) : value).map(Number);
  if (list.length !== 3 || list.some((v) => !Number.isFinite(v))) fail(`explainer.json's ${name} is not 3 numbers`);
  return list;
}

// --- photos: decode to RGB bytes ---------------------------------------------------------------------------------

function decode(file) {
  const bytes = fs.readFileSync(file);
  let width, height, data, channels;
  if (bytes[0] === 0xff && bytes[1] === 0xd8) {
    const jpeg = require("jpeg-js");
    ({ width, height, data } = jpeg.decode(bytes, { useTArray: true, formatAsRGBA: false, maxResolutionInMP: 90 }));
    channels = 3;
  } else if (bytes.subarray(1, 4).toString("latin1") === "PNG") {
    const { PNG } = require("pngjs");
    ({ width, height, data } = PNG.sync.read(bytes)); // RGBA, 8 bits (16-bit PNGs are scaled down by pngjs)
    channels = 4;
  } else {
    fail(`${file}: not a JPEG or PNG file`);
  }
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0; i < width * height; i++) {
    const alpha = channels === 4 ? data[i * 4 + 3] : 255;
    for (let c = 0; c < 3; c++) {
      const value = data[i * channels + c];
      // transparent pixels on black, as fdcam.images does: Pillow's alpha_composite in its fixed point
      const scaled = value * alpha * 128 + (0x80 << 7);
      rgb[i * 3 + c] = (((scaled >> 8) + scaled) >> 8) >> 7;
    }
  }
  return { width, height, rgb };
}

// --- Pillow's Image.resize(BILINEAR) on 8-bit images: a triangle filter widened by the scale when shrinking,
// coefficients in 22-bit fixed point, horizontal pass first (rounded to 8 bits), then vertical ---------------------

const PRECISION_BITS = 32 - 8 - 2;

function coefficients(inSize, outSize) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = 1.0 * filterScale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const weights = new Int32Array(outSize * ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    const k = new Float64Array(xmax);
    let total = 0;
    for (let x = 0; x < xmax; x++) {
      const distance = Math.abs((x + xmin - center + 0.5) / filterScale);
      k[x] = distance < 1 ? 1 - distance : 0;
      total += k[x];
    }
    for (let x = 0; x < xmax; x++) {
      const w = total !== 0 ? k[x] / total : k[x];
      weights[xx * ksize + x] = Math.trunc(w < 0 ? -0.5 + w * (1 << PRECISION_BITS) : 0.5 + w * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, weights };
}

function clip8(sum) {
  if (sum >= 2 ** (PRECISION_BITS + 8)) return 255;
  if (sum <= 0) return 0;
  return Math.floor(sum / 2 ** PRECISION_BITS);
}

function resizeRgb({ width, height, rgb }, outWidth, outHeight) {
  let pixels = rgb;
  let w = width;
  if (outWidth !== width) {
    const { ksize, bounds, weights } = coefficients(width, outWidth);
    const out = new Uint8Array(outWidth * height * 3);
    for (let y = 0; y < height; y++) {
      for (let xx = 0; xx < outWidth; xx++) {
        const [xmin, xmax] = [bounds[xx * 2], bounds[xx * 2 + 1]];
        for (let c = 0; c < 3; c++) {
          let sum = 2 ** (PRECISION_BITS - 1);
          for (let x = 0; x < xmax; x++) sum += pixels[(y * w + xmin + x) * 3 + c] * weights[xx * ksize + x];
          out[(y * outWidth + xx) * 3 + c] = clip8(sum);
        }
      }
    }
    pixels = out;
    w = outWidth;
  }
  if (outHeight !== height) {
    const { ksize, bounds, weights } = coefficients(height, outHeight);
    const out = new Uint8Array(w * outHeight * 3);
    for (let yy = 0; yy < outHeight; yy++) {
      const [ymin, ymax] = [bounds[yy * 2], bounds[yy * 2 + 1]];
      for (let x = 0; x < w; x++) {
        for (let c = 0; c < 3; c++) {
          let sum = 2 ** (PRECISION_BITS - 1);
          for (let y = 0; y < ymax; y++) sum += pixels[((ymin + y) * w + x) * 3 + c] * weights[yy * ksize + y];
          out[(yy * w + x) * 3 + c] = clip8(sum);
        }
      }
    }
    pixels = out;
  }
  return pixels;
}

// float32 arithmetic as torch does it: (x / 255 - mean) / std, channel-first
function normalise(rgb, height, width, mean, std, into, offset) {
  const f = Math.fround;
  for (let c = 0; c < 3; c++) {
    const [m, s] = [f(mean[c]), f(std[c])];
    for (let i = 0; i < height * width; i++) {
      into[offset + c * height * width + i] = f(f(f(rgb[i * 3 + c] / 255) - m) / s);
    }
  }
}

// --- overlays: the map resized to the photo (bilinear, align_corners=False), JET, blended half and half -----------

const JET = [
  [[0.0, 0.35, 0.66, 0.89, 1.0], [0.0, 0.0, 1.0, 1.0, 0.5]],
  [[0.0, 0.125, 0.375, 0.64, 0.91, 1.0], [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]],
  [[0.0, 0.11, 0.34, 0.65, 1.0], [0.5, 1.0, 1.0, 0.0, 0.0]],
];

function interpolate(value, [positions, levels]) {
  let i = 1;
  while (i < positions.length - 1 && value > positions[i]) i++;
  const t = (value - positions[i - 1]) / (positions[i] - positions[i - 1]);
  return levels[i - 1] + Math.min(Math.max(t, 0), 1) * (levels[i] - levels[i - 1]);
}

function sourceIndex(dst, inSize, outSize) {
  const src = Math.max((inSize / outSize) * (dst + 0.5) - 0.5, 0);
  const low = Math.floor(src);
  return [low, low < inSize - 1 ? low + 1 : low, src - low];
}

function roundHalfEven(value) {
  const rounded = Math.round(value); // numpy's rint: ties to even (half the blends of an even level end in .5)
  return rounded - value === 0.5 && rounded % 2 !== 0 ? rounded - 1 : rounded;
}

function overlayPng(photo, map, mapHeight, mapWidth) {
  const { PNG } = require("pngjs");
  const png = new PNG({ width: photo.width, height: photo.height, colorType: 2, inputHasAlpha: false });
  const columns = Array.from({ length: photo.width }, (_, x) => sourceIndex(x, mapWidth, photo.width));
  for (let y = 0; y < photo.height; y++) {
    const [y0, y1, ly] = sourceIndex(y, mapHeight, photo.height);
    for (let x = 0; x < photo.width; x++) {
      const [x0, x1, lx] = columns[x];
      const top = (1 - lx) * map[y0 * mapWidth + x0] + lx * map[y0 * mapWidth + x1];
      const bottom = (1 - lx) * map[y1 * mapWidth + x0] + lx * map[y1 * mapWidth + x1];
      const raw = (1 - ly) * top + ly * bottom;
      const value = Number.isNaN(raw) ? 0 : Math.min(Math.max(raw, 0), 1);
      for (let c = 0; c < 3; c++) {
        const blended = 0.5 * photo.rgb[(y * photo.width + x) * 3 + c] + 0.5 * 255 * interpolate(value, JET[c]);
        png.data[(y * photo.width + x) * 3 + c] = Math.min(Math.max(roundHalfEven(blended), 0), 255);
      }
    }
  }
  return PNG.sync.write(png, { colorType: 2, inputHasAlpha: false });
}

// --- the command -------------------------------------------------------------------------------------------------

async function main(argv) {
  const classesAt = argv.indexOf("--classes");
  const regionAt = argv.indexOf("--region");
  const options = [classesAt, regionAt].filter((i) => i >= 0).flatMap((i) => [i, i + 1]);
  const positional = argv.filter((_, i) => !options.includes(i));
  const [modelPath, ...inputs] = positional;
  const outPrefix = inputs.pop();
  if (!modelPath || !inputs.length || !outPrefix) {
    fail("usage: node explain.js explainer.onnx photo.jpg|photo.png|images.f32 ... out_prefix [--classes 1,2]");
  }
  const description = JSON.parse(fs.readFileSync(modelPath.replace(/\.onnx$/, ".json"), "utf8"));
  const [height, width] = inputSize(description.input_size);
  const perImage = 3 * height * width;

  let pixels;
  let photos = [];
  if (inputs.length === 1 && inputs[0].endsWith(".f32")) {
    const bytes = fs.readFileSync(inputs[0]);
    if (bytes.length % (4 * perImage) !== 0) fail(`${inputs[0]} does not hold float32 images of 3x${height}x${width}`);
    pixels = new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length));
  } else {
    const [mean, std] = [numbers(description.mean, "mean"), numbers(description.std, "std")];
    photos = inputs.map((file) => ({ file, ...decode(file) }));
    pixels = new Float32Array(photos.length * perImage);
    photos.forEach((photo, i) => {
      normalise(resizeRgb(photo, width, height), height, width, mean, std, pixels, i * perImage);
    });
  }
  const n = pixels.length / perImage;

  const ort = require("onnxruntime-node");
  const feeds = { image: new ort.Tensor("float32", pixels, [n, 3, height, width]) };
  if (classesAt >= 0) {
    if (!flag(description.classes_input)) fail("this graph was exported without --classes-input");
    const classes = String(argv[classesAt + 1] || "").split(",").map((c) => parseInt(c, 10));
    if (!classes.length || classes.some((c) => !Number.isInteger(c))) fail("--classes takes class indices: 340,1");
    const all = [];
    for (let i = 0; i < n; i++) all.push(...classes.map(BigInt));
    feeds.classes = new ort.Tensor("int64", BigInt64Array.from(all), [n, classes.length]);
  } else if (flag(description.classes_input)) {
    fail("this graph needs --classes");
  }
  if (description.target === "region") {
    if (regionAt < 0 || !argv[regionAt + 1]) fail("this region graph needs --region REGIONS.f32 (float32 [N,T,h,w])");
    const [h, w] = inputSize(description.region_size);
    const bytes = fs.readFileSync(argv[regionAt + 1]);
    const t = feeds.classes.dims[1];
    if (bytes.length !== 4 * n * t * h * w) fail(`${argv[regionAt + 1]} does not hold float32 regions of ${n}x${t}x${h}x${w}`);
    const masks = new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length));
    feeds.region = new ort.Tensor("float32", masks, [n, t, h, w]);
  } else if (regionAt >= 0) {
    fail("--region applies to a graph exported with --target region");
  }

  const session = await ort.InferenceSession.create(modelPath, { executionProviders: ["cpu"] });
  const { logits, targets, saliency } = await session.run(feeds);
  const t = saliency.dims[1];

  fs.mkdirSync(path.dirname(path.resolve(outPrefix)), { recursive: true });
  fs.writeFileSync(`${outPrefix}.saliency.f32`, Buffer.from(saliency.data.buffer, saliency.data.byteOffset, saliency.data.byteLength));
  const numClasses = logits.dims[1];
  const summary = [];
  for (let i = 0; i < n; i++) {
    const row = logits.data.subarray(i * numClasses, (i + 1) * numClasses);
    let top = 0;
    for (let c = 1; c < numClasses; c++) if (row[c] > row[top]) top = c;
    const explained = Array.from(targets.data.subarray(i * t, (i + 1) * t), Number);
    summary.push({ file: photos[i] ? photos[i].file : null, top1: top, top1_logit: row[top], targets: explained });
    for (let j = 0; j < t; j++) {
      const map = saliency.data.subarray((i * t + j) * height * width, (i * t + j + 1) * height * width);
      if (map.every(Number.isNaN)) {
        // the graph refuses as the library does (non-finite image, logits or region, class out of range): NaN maps
        const name = photos[i] ? photos[i].file : `image ${i}`;
        console.error(`explain.js: refused: ${name}, class ${explained[j]}: non-finite input or class out of range`);
        summary[i].refused = [...(summary[i].refused || []), j];
        continue;
      }
      const grey = Buffer.from(Array.from(map, (v) => Math.round(255 * v)));
      fs.writeFileSync(`${outPrefix}.${i}.${j}.pgm`, Buffer.concat([Buffer.from(`P5\n${width} ${height}\n255\n`), grey]));
      if (photos[i]) fs.writeFileSync(`${outPrefix}.${i}.${j}.png`, overlayPng(photos[i], map, height, width));
    }
  }
  fs.writeFileSync(`${outPrefix}.json`, JSON.stringify({ shape: saliency.dims, images: summary }, null, 2) + "\n");
  const overlays = photos.length ? ", overlays .png" : "";
  console.log(`${path.resolve(outPrefix)}.saliency.f32 [${saliency.dims.join(",")}]${overlays}`);
  if (summary.some((image) => image.refused)) process.exitCode = 1; // the others were written, as fdcam explain does
}

main(process.argv.slice(2)).catch((error) => fail(String(error.message || error).split("\n")[0]));
