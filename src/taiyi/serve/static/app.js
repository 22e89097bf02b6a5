// taiyi web page: plain JavaScript, no build step, nothing loaded from elsewhere.
// Talks to the same server's OpenAI-shaped API; every user-visible text is set with textContent (no HTML injection).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  // Style presets: [button label, text appended to the prompt].
  const STYLES = [
    ["无", ""],
    ["水彩", "水彩画"],
    ["油画", "油画"],
    ["水墨", "水墨画，国画"],
    ["插画", "插画"],
    ["工笔", "工笔画"],
    ["素描", "素描"],
    ["浮世绘", "浮世绘"],
    ["赛博朋克", "赛博朋克"],
    ["像素风", "像素风"],
    ["动漫", "动漫风格"],
    ["写实摄影", "写实摄影，高清"],
  ];
  const KEY_STORAGE = "taiyi-api-key";

  let info = null; // GET /healthz
  let style = "";
  let strengthTouched = false;

  // --- helpers ---------------------------------------------------------------------------------------
  function setStatus(text, isError = false) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("error", isError);
  }

  function intOrNull(value) {
    const text = String(value).trim();
    if (/^\d+$/.test(text)) return text; // kept as text: seeds may exceed JavaScript's exact integers
    const number = Number(text); // what a number field also accepts, such as 1e5
    return text !== "" && Number.isSafeInteger(number) && number >= 0 ? String(number) : null;
  }

  // A whole-number field of the 图生图 tab, which is no form (the browser checks nothing there): its value as text,
  // `empty` when blank; past its min or max, an error that says so in Chinese (never silently another value).
  function wholeField(id, name, empty) {
    const input = $(id);
    if (input.value.trim() === "" && !input.validity.badInput) return empty;
    const value = intOrNull(input.value);
    const low = Number(input.min || 0);
    const high = input.max === "" ? Infinity : Number(input.max);
    if (value === null || Number(value) < low || Number(value) > high) {
      const range = high === Infinity ? `${low} 或更大的整数` : `${low} 到 ${high} 之间的整数`;
      throw new Error(`${name}须为 ${range}，不是「${input.value || "无法识别的内容"}」`);
    }
    return value;
  }

  // What each HTTP status means, in words, before the server's own (English) message.
  const STATUS_WORDS = {
    400: "请求有误",
    404: "未找到",
    413: "上传内容过大",
    415: "不支持的图片格式",
    500: "服务器内部错误",
    502: "服务器暂不可用",
    503: "服务器暂不可用或正在关闭",
    504: "请求超时",
  };

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = $("api-key").value.trim();
    if (key) headers.set("Authorization", "Bearer " + key);
    let res;
    try {
      res = await fetch(path, { ...options, headers });
    } catch (err) {
      throw new Error("无法连接服务器：" + err.message);
    }
    let body = null;
    try {
      body = await res.json();
    } catch (err) {
      body = null;
    }
    if (!res.ok) {
      const message = (body && body.error && body.error.message) || res.statusText || "无详细信息";
      if (res.status === 401) {
        $("key-box").hidden = false;
        throw new Error("需要正确的 API 密钥（" + message + "）");
      }
      if (res.status === 429) {
        const wait = res.headers.get("Retry-After") || "几";
        throw new Error(`服务器繁忙，请 ${wait} 秒后重试（${message}）`);
      }
      const words = STATUS_WORDS[res.status] || (res.status >= 500 ? "服务器出错" : "请求未被接受");
      throw new Error(`出错了（${res.status} ${words}）：${message}`);
    }
    if (!body || typeof body !== "object") throw new Error("服务器的回答无法读取（不是 JSON）");
    return body;
  }

  function itemsOf(result) {
    if (!Array.isArray(result.data)) throw new Error("服务器的回答缺少 data 列表");
    return result.data;
  }

  async function busy(button, text, work) {
    button.disabled = true;
    const started = performance.now();
    const tick = () => setStatus(`${text}…… ${((performance.now() - started) / 1000).toFixed(1)} 秒`);
    tick();
    const timer = setInterval(tick, 200);
    try {
      await work();
      setStatus(`完成，用时 ${((performance.now() - started) / 1000).toFixed(1)} 秒`);
    } catch (err) {
      setStatus(err.message, true);
    } finally {
      clearInterval(timer);
      button.disabled = false;
    }
  }

  // --- tabs ------------------------------------------------------------------------------------------
  function showTab(name) {
    for (const button of document.querySelectorAll(".tabs button")) {
      const active = button.dataset.tab === name;
      button.setAttribute("aria-selected", String(active));
      $("tab-" + button.dataset.tab).hidden = !active;
    }
  }

  // --- text to image ---------------------------------------------------------------------------------
  function finalPrompt() {
    const prompt = $("prompt").value.trim();
    if (!style) return prompt;
    if (!prompt) return style;
    return /[，,。.;；、]$/.test(prompt) ? prompt + style : prompt + "，" + style;
  }

  function showFinalPrompt() {
    $("final-prompt").textContent = finalPrompt() || "（空）";
  }

  function buildPresets() {
    const box = $("presets");
    for (const [label, text] of STYLES) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = label;
      button.dataset.style = text;
      button.setAttribute("aria-pressed", String(text === style));
      button.addEventListener("click", () => {
        style = text;
        for (const b of box.children) b.setAttribute("aria-pressed", String(b.dataset.style === style));
        showFinalPrompt();
      });
      box.appendChild(button);
    }
  }

  async function generate(event) {
    event.preventDefault();
    const prompt = finalPrompt();
    if (!prompt) {
      setStatus("请先输入提示词", true);
      return;
    }
    const body = {
      prompt,
      n: Number($("n").value) || 1,
      size: $("size").value,
      steps: Number($("steps").value) || undefined,
      scheduler: $("scheduler").value,
    };
    const negative = $("negative").value.trim();
    if (negative) body.negative_prompt = negative;
    const seed = intOrNull($("seed").value);
    if (seed !== null) body.seed = seed;
    const guidance = $("guidance").value.trim();
    if (guidance !== "") body.guidance = Number(guidance);
    if ($("hires").checked) {
      // A1111's hires fix: drawn at the chosen size, upscaled, and redrawn at this strength
      const scale = $("hires-scale").value.trim() === "" ? 2 : Number($("hires-scale").value);
      const strength = $("hires-strength").value.trim() === "" ? 0.5 : Number($("hires-strength").value);
      const problem = hiresProblem(scale, strength, body.steps || info.default_steps, body.size);
      if (problem) {
        setStatus(problem, true);
        return;
      }
      body.hires_scale = scale;
      body.hires_strength = strength;
    }
    await busy($("generate"), "生成中", async () => {
      const result = await api("/v1/images/generations", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      itemsOf(result).slice().reverse().forEach((item) => addToGallery(item, "文生图"));
    });
  }

  // What the server would refuse in the hires fix, said before sending (null: nothing)
  function hiresProblem(scale, strength, steps, size) {
    if (!(scale >= 1 && scale <= 4)) return `放大倍数须在 1 到 4 之间（2 即长宽各放大一倍），不是 ${scale}`;
    if (!(strength > 0 && strength <= 1)) return `高清修复的重绘强度须大于 0、不超过 1，不是 ${strength}`;
    if (Math.floor(steps * strength) < 1) {
      return `高清修复的重绘强度 ${strength} × 步数 ${steps} 不足一步：请提高重绘强度或步数`;
    }
    const [width, height] = size.split("x").map(Number);
    const grown = (side) => Math.floor(Math.floor(side * scale) / 8) * 8; // the server's rounding: down to 8s
    const most = info.limits.max_side;
    if (grown(width) > most || grown(height) > most) {
      return `高清修复后为 ${grown(width)} × ${grown(height)}，超出服务器上限 ${most} 像素：请减小放大倍数或尺寸`;
    }
    return null;
  }

  function syncHires() {
    // unused fields are disabled: the browser then neither checks them nor blocks 生成 over them
    for (const id of ["hires-scale", "hires-strength"]) $(id).disabled = !$("hires").checked;
  }

  // --- gallery ---------------------------------------------------------------------------------------
  let shown = 0; // pictures put in the gallery so far: numbers the downloads, which a reused seed would collide
  const KIND_NAMES = { 文生图: "generate", 图生图: "edit", 局部重绘: "inpaint", 扩图: "outpaint" };

  function addToGallery(item, kind) {
    shown += 1;
    const src = "data:image/png;base64," + item.b64_json;
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = src;
    img.alt = item.revised_prompt;
    img.dataset.seed = String(item.seed);
    figure.appendChild(img);

    const caption = document.createElement("figcaption");
    const title = document.createElement("div");
    title.textContent = `${kind} · 种子 ${item.seed}`;
    const params = document.createElement("pre");
    params.className = "parameters";
    params.textContent = item.parameters;
    const actions = document.createElement("div");
    actions.className = "actions";

    const download = document.createElement("a");
    download.href = src;
    download.download = `taiyi-${String(shown).padStart(3, "0")}-${KIND_NAMES[kind]}-seed${item.seed}.png`;
    download.textContent = "下载";
    const edit = document.createElement("button");
    edit.type = "button";
    edit.textContent = "编辑";
    edit.addEventListener("click", () => {
      loadEditImage(src);
      if (!$("edit-prompt").value) $("edit-prompt").value = item.revised_prompt;
      showTab("edit");
    });
    const reuse = document.createElement("button");
    reuse.type = "button";
    reuse.textContent = "复用种子";
    reuse.addEventListener("click", () => {
      $("seed").value = String(item.seed);
      showTab("generate");
    });
    actions.append(download, edit, reuse);
    caption.append(title, params, actions);
    figure.appendChild(caption);
    $("gallery").prepend(figure);
  }

  // --- edit and inpaint --------------------------------------------------------------------------------
  const editCanvas = () => $("edit-canvas");
  const maskCanvas = () => $("mask-canvas");

  function loadEditImage(src) {
    const img = new Image();
    img.onload = () => {
      // Fit the server's size limit; sides are multiples of 8 as the model needs.
      const limit = info ? info.limits.max_side : 1024;
      const scale = Math.min(1, limit / Math.max(img.naturalWidth, img.naturalHeight));
      const fit = (side) => Math.max(64, Math.min(limit, Math.round((side * scale) / 8) * 8));
      const w = fit(img.naturalWidth);
      const h = fit(img.naturalHeight);
      for (const canvas of [editCanvas(), maskCanvas()]) {
        canvas.width = w;
        canvas.height = h;
      }
      const ctx = editCanvas().getContext("2d");
      // On white, as the library reads a transparent file: the server would take transparent pixels for a
      // mask (OpenAI's convention), and here only the painted mask decides what is redrawn.
      ctx.fillStyle = "#fff";
      ctx.fillRect(0, 0, w, h);
      ctx.drawImage(img, 0, 0, w, h);
      editCanvas().style.width = Math.max(w, Math.min(512, 4 * w)) + "px"; // small images shown larger
      $("canvas-wrap").hidden = false;
      setStatus(`已载入图片 ${w}×${h}，可在图上涂抹蒙版`);
    };
    img.onerror = () => setStatus("无法读取这张图片", true);
    img.src = src;
  }

  function maskHasPaint() {
    const canvas = maskCanvas();
    if (!canvas.width) return false;
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i] >= 128) return true; // the server's threshold
    return false;
  }

  function setupPainting() {
    const canvas = maskCanvas();
    const ctx = canvas.getContext("2d", { willReadFrequently: true }); // read back by maskHasPaint
    let last = null;
    const point = (event) => {
      const rect = canvas.getBoundingClientRect();
      return {
        x: ((event.clientX - rect.left) * canvas.width) / rect.width,
        y: ((event.clientY - rect.top) * canvas.height) / rect.height,
        scale: canvas.width / rect.width,
      };
    };
    const stroke = (from, to) => {
      ctx.globalCompositeOperation = $("erase").checked ? "destination-out" : "source-over";
      ctx.strokeStyle = "#d23c32";
      ctx.fillStyle = "#d23c32";
      ctx.lineCap = "round";
      ctx.lineJoin = "round";
      ctx.lineWidth = Math.max(2, Number($("brush").value) * to.scale); // thinner lines would be too faint to count
      ctx.beginPath();
      ctx.moveTo(from.x, from.y);
      ctx.lineTo(to.x + 0.01, to.y);
      ctx.stroke();
    };
    canvas.addEventListener("pointerdown", (event) => {
      canvas.setPointerCapture(event.pointerId);
      last = point(event);
      stroke(last, last);
      if (!$("erase").checked && !strengthTouched) setStrength(1.0); // inpainting redraws the area fully
    });
    canvas.addEventListener("pointermove", (event) => {
      if (!last) return;
      const next = point(event);
      stroke(last, next);
      last = next;
    });
    const stop = () => {
      last = null;
    };
    canvas.addEventListener("pointerup", stop);
    canvas.addEventListener("pointercancel", stop);
    $("clear-mask").addEventListener("click", () => ctx.clearRect(0, 0, canvas.width, canvas.height));
  }

  function setStrength(value) {
    $("strength").value = String(value);
    $("strength-out").textContent = String(value);
  }

  const toBlob = (canvas) => new Promise((resolve) => canvas.toBlob(resolve, "image/png"));

  async function runEdit() {
    if ($("canvas-wrap").hidden) {
      setStatus("请先上传图片，或在画廊中点「编辑」", true);
      return;
    }
    const prompt = $("edit-prompt").value.trim();
    if (!prompt) {
      setStatus("请输入编辑提示词", true);
      return;
    }
    let n, steps;
    try {
      n = wholeField("edit-n", "数量", "1");
      steps = wholeField("edit-steps", "步数", null);
    } catch (err) {
      setStatus(err.message, true);
      return;
    }
    await busy($("edit-run"), "编辑中", async () => {
      const form = new FormData();
      form.append("image", await toBlob(editCanvas()), "image.png");
      const inpaint = maskHasPaint();
      if (inpaint) {
        // OpenAI's mask convention: transparent pixels = the area to redraw.
        const canvas = document.createElement("canvas");
        canvas.width = editCanvas().width;
        canvas.height = editCanvas().height;
        const ctx = canvas.getContext("2d");
        ctx.fillStyle = "#000";
        ctx.fillRect(0, 0, canvas.width, canvas.height);
        ctx.globalCompositeOperation = "destination-out";
        ctx.drawImage(maskCanvas(), 0, 0);
        form.append("mask", await toBlob(canvas), "mask.png");
        if ($("only-masked").checked) form.append("only_masked", "true"); // A1111's "Inpaint area: Only masked"
      }
      form.append("prompt", prompt);
      form.append("strength", $("strength").value);
      form.append("n", n);
      if (steps !== null) form.append("steps", steps);
      const seed = intOrNull($("edit-seed").value);
      if (seed !== null) form.append("seed", seed);
      const negative = $("edit-negative").value.trim();
      if (negative) form.append("negative_prompt", negative);
      const result = await api("/v1/images/edits", { method: "POST", body: form });
      itemsOf(result).slice().reverse().forEach((item) => addToGallery(item, inpaint ? "局部重绘" : "图生图"));
    });
  }

  // 扩图: the picture being edited on a grown canvas, the margin drawn by the server
  async function runOutpaint() {
    if ($("canvas-wrap").hidden) {
      setStatus("请先上传图片，或在画廊中点「编辑」", true);
      return;
    }
    const prompt = $("edit-prompt").value.trim();
    if (!prompt) {
      setStatus("请输入提示词（描述扩展后的整幅画面）", true);
      return;
    }
    const sides = {};
    let n, steps;
    try {
      for (const [side, name] of Object.entries({ left: "左", top: "上", right: "右", bottom: "下" })) {
        sides[side] = Number(wholeField("out-" + side, `扩图的「${name}」`, "0"));
      }
      n = wholeField("edit-n", "数量", "1");
      steps = wholeField("edit-steps", "步数", null);
    } catch (err) {
      setStatus(err.message, true);
      return;
    }
    if (!Object.values(sides).some((v) => v > 0)) {
      setStatus("请至少在一边填入要扩展的像素数", true);
      return;
    }
    const most = info.limits.max_side;
    const grownWidth = editCanvas().width + sides.left + sides.right;
    const grownHeight = editCanvas().height + sides.top + sides.bottom;
    if (grownWidth > most || grownHeight > most) {
      setStatus(`扩图后为 ${grownWidth} × ${grownHeight}，超出服务器上限 ${most} 像素：请减少扩展的像素数`, true);
      return;
    }
    await busy($("outpaint-run"), "扩图中", async () => {
      const body = { image: editCanvas().toDataURL("image/png"), prompt, ...sides };
      body.n = Number(n);
      if (steps !== null) body.steps = Number(steps);
      const seed = intOrNull($("edit-seed").value);
      if (seed !== null) body.seed = seed; // as text, like the generate form: seeds past 2^53 stay exact
      const negative = $("edit-negative").value.trim();
      if (negative) body.negative_prompt = negative;
      const result = await api("/v1/images/outpaint", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      itemsOf(result).slice().reverse().forEach((item) => addToGallery(item, "扩图"));
    });
  }

  // 提示词反推: the CLIP reads the picture being edited into a Chinese prompt
  async function runInterrogate() {
    if ($("canvas-wrap").hidden) {
      setStatus("请先上传图片，或在画廊中点「编辑」", true);
      return;
    }
    await busy($("interrogate-run"), "反推中", async () => {
      const image = editCanvas().toDataURL("image/png");
      const result = await api("/v1/clip/interrogate", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ images: [image] }),
      });
      const prompt = itemsOf(result)[0].prompt;
      if (!prompt) throw new Error("CLIP 对这张图没有把握，未得出提示词");
      $("edit-prompt").value = prompt;
    });
  }

  // --- CLIP search -------------------------------------------------------------------------------------
  async function search(event) {
    event.preventDefault();
    const query = $("query").value.trim();
    if (!query) {
      setStatus("请输入要搜索的描述", true);
      return;
    }
    await busy($("search-run"), "搜索中", async () => {
      const result = await api("/v1/clip/search", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ query, k: Number($("k").value) || 12 }),
      });
      const box = $("search-results");
      box.replaceChildren();
      for (const hit of itemsOf(result)) {
        const figure = document.createElement("figure");
        if (hit.thumbnail) {
          const img = document.createElement("img");
          img.src = hit.thumbnail;
          img.alt = hit.path;
          figure.appendChild(img);
        }
        const caption = document.createElement("figcaption");
        caption.textContent = `${hit.rank}. 相似度 ${hit.score.toFixed(3)} · ${hit.path}`;
        figure.appendChild(caption);
        box.appendChild(figure);
      }
      if (!result.data.length) setStatus("没有找到图片");
    });
  }

  // --- start -----------------------------------------------------------------------------------------
  function fillSettings() {
    $("model-name").textContent = "模型：" + info.model;
    const d = info.default_size;
    const sizes = [
      [d, d],
      [512, 512],
      [512, 768],
      [768, 512],
      [768, 768],
      [1024, 1024],
    ].filter(([w, h]) => w <= info.limits.max_side && h <= info.limits.max_side);
    const seen = new Set();
    for (const [w, h] of sizes) {
      const value = `${w}x${h}`;
      if (seen.has(value)) continue;
      seen.add(value);
      const option = new Option(`${w} × ${h}${w === d && h === d ? "（模型默认）" : ""}`, value);
      $("size").add(option);
    }
    $("interrogate-run").hidden = !info.clip;
    for (const name of info.schedulers) $("scheduler").add(new Option(name, name));
    $("scheduler").value = info.default_scheduler;
    for (const id of ["steps", "edit-steps"]) {
      $(id).max = String(info.limits.max_steps);
      $(id).value = String(Math.min(info.default_steps, info.limits.max_steps));
    }
    for (const id of ["n", "edit-n"]) $(id).max = String(info.limits.max_n);
    $("guidance").placeholder = String(info.default_guidance);
    if (info.auth) $("key-box").hidden = false;
    const searchable = info.clip && info.clip_index;
    $("search-off").hidden = searchable;
    $("search-run").disabled = !searchable;
  }

  async function start() {
    buildPresets();
    showFinalPrompt();
    $("prompt").addEventListener("input", showFinalPrompt);
    for (const button of document.querySelectorAll(".tabs button")) {
      button.addEventListener("click", () => showTab(button.dataset.tab));
    }
    const stored = sessionStorage.getItem(KEY_STORAGE);
    if (stored) $("api-key").value = stored;
    $("api-key").addEventListener("change", () => sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim()));
    $("key-box").addEventListener("submit", (event) => event.preventDefault());
    $("gen-form").addEventListener("submit", generate);
    $("hires").addEventListener("change", syncHires);
    syncHires();
    $("edit-run").addEventListener("click", runEdit);
    $("interrogate-run").addEventListener("click", runInterrogate);
    $("outpaint-run").addEventListener("click", runOutpaint);
    $("search-form").addEventListener("submit", search);
    $("strength").addEventListener("input", () => {
      strengthTouched = true;
      $("strength-out").textContent = $("strength").value;
    });
    $("edit-file").addEventListener("change", () => {
      const file = $("edit-file").files[0];
      if (file) loadEditImage(URL.createObjectURL(file));
    });
    setupPainting();
    window.addEventListener("beforeunload", (event) => {
      if ($("gallery").children.length) event.preventDefault(); // the gallery lives only in this page: ask first
    });
    try {
      const res = await fetch("/healthz");
      let health = null;
      try {
        health = await res.json();
      } catch (err) {
        health = null;
      }
      if (!health || !health.limits) throw new Error(`服务器没有给出状态（${res.status}）`);
      info = health;
      fillSettings();
      document.body.dataset.ready = "true";
      if (info.status !== "ok") setStatus("服务器正在关闭，暂不接受新请求", true);
    } catch (err) {
      setStatus("无法读取服务器状态：" + err.message, true);
    }
  }

  start();
})();
