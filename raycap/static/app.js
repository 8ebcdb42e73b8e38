// raycap's page. It calls the API as any client does, with the token pasted into it:
//   GET /models -> {models: [{name, checkpoint}], default}: the models the server holds,
//   POST /caption?beam_size=K&num_captions=K&attention=true[&model=NAME], the image as the body.
// Failures show the API's own JSON `detail`, in a sentence.

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "raycap-token"; // sessionStorage: kept across reloads of this tab, gone with it
const CANVAS_SIDE = 512; // heatmap canvas pixels on the long side: the map is smooth, more adds nothing
// Heatmap colours, from where the model looked least (dark purple) to most (yellow), over the image
// at one opacity: blending colours of one alpha keeps the drawn map linear in the weights.
const COLD = [40, 0, 90];
const HOT = [255, 200, 0];
const ALPHA = 150;

const state = {
  file: null, // the File last dropped or picked
  response: null, // the last successful /caption body
  beam: 0, // which caption's words are shown
  word: -1, // whose attention map is drawn; -1: none
  sent: 0, // requests sent: a slow answer to an older one must not replace a newer one
};

function request(path, init = {}) {
  const headers = new Headers(init.headers);
  const token = $("token").value.trim();
  if (token) headers.set("Authorization", `Bearer ${token}`);
  return fetch(new URL(path, document.baseURI), { ...init, headers });
}

/** A sentence for a failed response, from the API's JSON `detail` (a string for every 4xx), or the
 * start of a body that is not the API's (a proxy's error page). */
async function failure(response, what) {
  const text = await response.text();
  let detail;
  try {
    detail = JSON.parse(text).detail;
  } catch {
    detail = text.trim().slice(0, 300);
  }
  detail = detail || response.statusText || "no reason given";
  switch (response.status) {
    case 401:
      return $("token").value.trim()
        ? `The server refused this token: check it and paste it again (${detail}).`
        : `This server requires an access token: paste it into Token above (${detail}).`;
    case 400:
    case 415:
      return `${what} could not be captioned: ${detail}.`;
    case 413:
      return `${what} is too large: ${detail}.`;
    case 422:
      return `The options were refused: ${detail}.`;
    default:
      return `${what} failed (HTTP ${response.status}): ${detail}.`;
  }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function loadModels() {
  let response;
  try {
    response = await request("models");
  } catch (err) {
    showError(`Could not reach the server: ${err.message}.`);
    return;
  }
  if (!response.ok) {
    showError(await failure(response, "Listing the models"));
    return;
  }
  const body = await response.json();
  const names = body.models.map((m) => m.name);
  $("model").replaceChildren(...names.map((name) => new Option(name, name)));
  $("model").value = body.default;
  clearError();
}

async function caption() {
  const file = state.file;
  if (!file) return;
  const beamSize = $("beam-size").value;
  const query = new URLSearchParams({ beam_size: beamSize, num_captions: beamSize, attention: "true" });
  query.set("model", $("model").value);
  const sent = ++state.sent;
  clearError();
  $("result").hidden = true;
  $("status").textContent = `Captioning ${file.name}…`;
  const started = performance.now();
  let response;
  try {
    const headers = { "Content-Type": file.type || "application/octet-stream" };
    response = await request(`caption?${query}`, { method: "POST", body: file, headers });
  } catch (err) {
    if (sent === state.sent) showError(`Could not reach the server: ${err.message}.`);
    return;
  }
  const message = response.ok ? null : await failure(response, file.name);
  const body = response.ok ? await response.json() : null;
  if (sent !== state.sent) return;
  if (message) {
    showError(message);
    return;
  }
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  const shown = await $("photo")
    .decode()
    .then(() => true, () => false);
  if (sent !== state.sent) return;
  state.response = body;
  state.beam = 0;
  state.word = -1;
  $("photo").parentElement.hidden = !shown; // a format the server reads but this browser cannot show
  $("status").textContent =
    `${file.name}: captioned by model ${body.model} in ${seconds} s` +
    (shown ? "." : " (this browser cannot display the image itself).");
  $("result").hidden = false;
  render();
}

/** The response's captions, best first: `beams` when several were asked for, else the one. */
function beams() {
  const r = state.response;
  return r.beams ?? [{ caption: r.caption, score: r.score, attention: r.attention }];
}

function render() {
  const all = beams();
  $("captions").replaceChildren(
    ...all.map((beam, i) => {
      const item = document.createElement("li");
      item.setAttribute("aria-current", String(i === state.beam));
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = beam.caption || "(empty caption)";
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = `log p ${beam.score.toFixed(3)}`;
      score.dataset.score = beam.score;
      item.append(text, score);
      item.addEventListener("click", () => {
        state.beam = i;
        state.word = -1;
        render();
      });
      return item;
    }),
  );
  const beam = all[state.beam];
  const hasMaps = Array.isArray(beam.attention);
  $("attention").hidden = !hasMaps;
  $("no-attention").hidden = hasMaps;
  const words = beam.caption.split(" ").filter(Boolean);
  $("words").replaceChildren(
    ...words.map((word, i) => {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = word;
      button.setAttribute("aria-pressed", String(i === state.word));
      const choose = () => selectWord(i);
      button.addEventListener("mouseenter", choose);
      button.addEventListener("focus", choose);
      button.addEventListener("click", choose);
      return button;
    }),
  );
  describeWord(words);
  drawHeatmap();
}

function selectWord(i) {
  if (i === state.word) return;
  state.word = i;
  $("words")
    .querySelectorAll("button")
    .forEach((b, j) => b.setAttribute("aria-pressed", String(j === i)));
  describeWord(beams()[state.beam].caption.split(" ").filter(Boolean));
  drawHeatmap();
}

function step(delta) {
  const count = $("words").children.length;
  if (count) selectWord(state.word < 0 ? (delta > 0 ? 0 : count - 1) : (state.word + delta + count) % count);
}

function describeWord(words) {
  const map = beams()[state.beam].attention?.[state.word];
  $("word-info").textContent = map
    ? `Word ${state.word + 1} of ${words.length}, “${words[state.word]}”: its strongest cell of the ` +
      `${map.length}×${map[0].length} grid holds ${(100 * Math.max(...map.flat())).toFixed(0)}% of its attention.`
    : words.length
      ? "Hover or tap a word, or step with ‹ ›, to see where the model looked for it."
      : "The caption is empty: no words to show.";
}

/** The selected word's (grid, grid) map over the image. The model sees the image squashed to a
 * square, so the map stretches over all of it; colours span the map's own range, as the reference's figures do. */
function drawHeatmap() {
  const photo = $("photo");
  const canvas = $("heatmap");
  const scale = Math.min(1, CANVAS_SIDE / Math.max(photo.naturalWidth, photo.naturalHeight, 1));
  canvas.width = Math.max(1, Math.round(photo.naturalWidth * scale));
  canvas.height = Math.max(1, Math.round(photo.naturalHeight * scale));
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  const map = beams()[state.beam].attention?.[state.word];
  if (!map) return;
  const rows = map.length;
  const cols = map[0].length;
  const values = map.flat();
  const lo = Math.min(...values);
  const hi = Math.max(...values);
  const cells = new ImageData(cols, rows);
  values.forEach((v, i) => {
    const t = hi > lo ? (v - lo) / (hi - lo) : 1;
    cells.data.set([...COLD.map((c, k) => Math.round(c + t * (HOT[k] - c))), ALPHA], 4 * i);
  });
  const grid = document.createElement("canvas");
  grid.width = cols;
  grid.height = rows;
  grid.getContext("2d").putImageData(cells, 0, 0);
  // Bilinear between cell centres ("low", the default: "high" is bicubic, which blurs each cell
  // into its neighbours), so the colour at a cell's centre is that cell's own weight.
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = "low";
  context.drawImage(grid, 0, 0, canvas.width, canvas.height);
}

function useFile(file) {
  if (!file) return;
  state.file = file;
  URL.revokeObjectURL($("photo").src);
  $("photo").src = URL.createObjectURL(file);
  caption();
}

function setUp() {
  $("token").value = sessionStorage.getItem(TOKEN_KEY) ?? "";
  $("token").addEventListener("change", async () => {
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    await loadModels();
    caption();
  });
  $("options").addEventListener("submit", (event) => event.preventDefault());
  $("beam-size").addEventListener("change", caption);
  $("model").addEventListener("change", caption);
  $("file").addEventListener("change", () => {
    useFile($("file").files[0]);
    $("file").value = ""; // picking the same file again captions it again
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    useFile(event.dataTransfer.files[0]);
  });
  // A file dropped beside the zone must not make the browser leave the page to open it.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  $("prev").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(1));
  $("words").addEventListener("keydown", (event) => {
    const delta = { ArrowLeft: -1, ArrowRight: 1 }[event.key];
    if (delta) {
      event.preventDefault();
      step(delta);
    }
  });
  loadModels();
}

setUp();
