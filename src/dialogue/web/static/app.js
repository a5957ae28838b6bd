/* dialogue web app: editors, selection, Jupyter-like keyboard, and small glue around htmx.
 *
 * Everything that changes the dialogue is an htmx request declared in the server's HTML; this
 * file only decides *when* to fire them (keys), where the selection is, and turns textareas
 * into CodeMirror editors when a cell is edited (lazily: a 1,000-cell dialogue opens with no
 * editor at all). No inline scripts: the page's CSP allows only files from /static.
 */
(function () {
  "use strict";

  var S = { sel: null, lastKey: "", lastKeyAt: 0 };

  // ------------------------------------------------------------------ cells and selection

  function cellsBox() { return document.getElementById("cells"); }
  function allCells() {
    var box = cellsBox();
    return box ? Array.prototype.slice.call(box.querySelectorAll(":scope > .cell")) : [];
  }
  function cellOf(el) { return el && el.closest ? el.closest("#cells > .cell") : null; }
  function selected() {
    var c = S.sel ? document.getElementById("m-" + S.sel) : null;
    return c && cellOf(c) === c ? c : null;
  }
  function editingCell() { return document.querySelector("#cells > .cell.editing"); }

  function select(cell, opts) {
    if (!cell) return;
    opts = opts || {};
    allCells().forEach(function (c) { if (c !== cell) c.classList.remove("selected"); });
    cell.classList.add("selected");
    S.sel = cell.dataset.id;
    attachTools(cell);
    if (opts.scroll !== false) cell.scrollIntoView({ block: "nearest" });
    if (opts.focus !== false && !cell.classList.contains("editing")) cell.focus({ preventScroll: true });
  }

  function neighbour(cell, step) {
    var cs = allCells();
    var i = cs.indexOf(cell);
    if (i < 0) return cs[0] || null;
    return cs[i + step] || null;
  }

  // Actions on a cell wait for that cell's request in flight: its answer replaces the cell's
  // element, and htmx drops a request queued on an element that has left the page. So an action
  // is kept by cell id and replayed on the new element once the answer is in.
  var inflight = {}, pending = {};

  function later(cell, fn) {
    if (!cell) return;
    var id = cell.dataset.id;
    if (inflight[id]) (pending[id] = pending[id] || []).push(fn);
    else fn(cell);
  }

  function act(cell, name) {
    later(cell, function (c) {
      attachTools(c);
      var el = c.querySelector('[data-act="' + name + '"]');
      if (el) el.click();
    });
  }

  // ------------------------------------------------------------------ the shared toolbar

  function tools() { return document.getElementById("tools"); }

  function attachTools(cell) {
    var t = tools();
    if (!t || !cell) return;
    if (t.parentNode !== cell) {
      var open = t.querySelector("details[open]");
      if (open) open.open = false;
      cell.appendChild(t);
    }
    var sel = t.querySelector('select[data-act="kind"]');
    if (sel) sel.value = cell.dataset.kind;
    t.querySelectorAll("[data-flag]").forEach(function (b) {
      b.setAttribute("aria-pressed", cell.classList.contains("is-" + b.dataset.flag) ? "true" : "false");
    });
  }

  function rescueTools(target) {
    var t = tools(), home = document.getElementById("tools-home");
    if (t && home && target && target.contains && target.contains(t)) home.appendChild(t);
  }

  function onConfigRequest(e) {
    var d = e.detail, cell = cellOf(d.elt);
    if (!cell) return;
    if (d.path && d.path.charAt(0) !== "/") d.path = cell.dataset.url + "/" + d.path;
    var where = d.elt.dataset && d.elt.dataset.where;
    if (where) d.parameters[where] = cell.dataset.id;
  }

  function onBeforeRequest(e) {
    var c = cellOf(e.detail.elt);
    if (!c || !e.detail.xhr) return;
    var xhr = e.detail.xhr;
    xhr._cellId = c.dataset.id;
    inflight[c.dataset.id] = (inflight[c.dataset.id] || 0) + 1;
    // htmx:afterRequest fires on the element that sent it: one replaced meanwhile (a Stop
    // button whose run ended) is out of the page, and its event never reaches the body
    xhr.addEventListener("loadend", function () { requestOver(xhr); });
  }

  function onAfterRequest(e) { if (e.detail.xhr) requestOver(e.detail.xhr); }

  function requestOver(xhr) {
    if (xhr._over) return;
    xhr._over = true;
    var id = xhr._cellId;
    if (!id || !inflight[id]) return;
    inflight[id] -= 1;
    if (inflight[id] > 0) return;
    setTimeout(function () {
      var list = pending[id] || [];
      pending[id] = [];
      list.forEach(function (fn) {
        var el = document.getElementById("m-" + id);
        if (el) later(el, fn);
      });
    }, 0);
  }

  // ------------------------------------------------------------------ editors

  function sourceArea(cell) { return cell.querySelector(".src textarea.editor"); }

  // A prompt's estimate of what it would send (routes/requests.py): asked for when its editor
  // opens and when typing pauses (ESTIMATE_IDLE ms after the last change), never per key; a
  // reply to older text than the latest asked for is dropped.
  var ESTIMATE_IDLE = 800;

  function estimateSoon(cell, delay) {
    var box = cell && cell.querySelector(".estimate");
    if (!box) return;
    clearTimeout(box._timer);
    box._timer = setTimeout(function () { estimate(cell, box); }, delay === undefined ? ESTIMATE_IDLE : delay);
  }

  function estimate(cell, box) {
    var ta = sourceArea(cell);
    if (!ta || !cell.dataset.url || !document.body.contains(box)) return;
    if (ta._cm) ta._cm.save();
    var body = new FormData();
    body.append("source", ta.value);
    var seq = (box._seq || 0) + 1;
    box._seq = seq;
    box.classList.add("pending");
    fetch(cell.dataset.url + "/estimate", { method: "POST", body: body, credentials: "same-origin",
                                            headers: { "HX-Request": "true" } })
      .then(function (r) { return r.json(); })
      .then(function (res) {
        if (seq !== box._seq) return;
        box.classList.remove("pending");
        box.classList.toggle("error", !!res.error);
        box.textContent = res.error ? "Cannot estimate: " + res.error : res.label;
      }, function () {
        if (seq === box._seq) { box.classList.remove("pending"); box.textContent = ""; }
      });
  }

  function ensureEditor(ta, cell) {
    if (ta._cm) return ta._cm;
    if (!window.CodeMirror) return null; // the plain textarea still works
    var mode = ta.dataset.mode === "python" ? "python" : ta.dataset.mode === "markdown" ? "markdown" : null;
    var isAnswer = ta.classList.contains("answer-editor");
    var keys = {
      "Shift-Enter": function () { isAnswer ? act(cell, "save-answer") : run(cell, true); },
      "Ctrl-Enter": function () { isAnswer ? act(cell, "save-answer") : run(cell, false); },
      "Cmd-Enter": function () { isAnswer ? act(cell, "save-answer") : run(cell, false); },
      "Esc": function () { isAnswer ? leaveAnswer(cell, ta) : leaveEdit(cell); },
      "Alt-Enter": function () { if (!isAnswer) runAndInsert(cell); },
      "Shift-Ctrl--": function (cm) { if (!isAnswer) splitAt(cell, cm); },
      "Shift-Cmd--": function (cm) { if (!isAnswer) splitAt(cell, cm); },
      "Ctrl-S": function () { isAnswer ? act(cell, "save-answer") : save(cell); },
      "Cmd-S": function () { isAnswer ? act(cell, "save-answer") : save(cell); },
      "Tab": function (cm) {
        if (cm.somethingSelected()) cm.indentSelection("add");
        else cm.replaceSelection(mode === "python" ? "    " : "  ", "end");
      },
      "Shift-Tab": function (cm) { cm.indentSelection("subtract"); }
    };
    var cm = window.CodeMirror.fromTextArea(ta, {
      mode: mode, indentUnit: 4, lineWrapping: mode !== "python", matchBrackets: true,
      viewportMargin: Infinity, extraKeys: keys, autofocus: false
    });
    cm.on("change", function () { cm.save(); if (!isAnswer) estimateSoon(cell); });
    ta._cm = cm;
    return cm;
  }

  function isDirty(cell) {
    var ta = sourceArea(cell);
    if (!ta) return false;
    if (ta._cm) ta._cm.save();
    return ta.value !== ta.defaultValue;
  }

  function enterEdit(cell) {
    if (!cell) return;
    var prev = editingCell();
    if (prev && prev !== cell) leaveEdit(prev, { keepFocus: false });
    select(cell, { focus: false });
    cell.classList.add("editing");
    var ta = sourceArea(cell);
    if (!ta) return;
    var cm = ensureEditor(ta, cell);
    estimateSoon(cell, 0);
    if (cm) {
      cm.refresh();
      cm.focus();
      if (!cell._placed) { cm.setCursor(cm.lineCount(), 0); cell._placed = true; }
    } else {
      ta.focus();
    }
  }

  function leaveEdit(cell, opts) {
    opts = opts || {};
    if (!cell || !cell.classList.contains("editing")) return;
    if (cell.querySelector(".conflict")) { // keep the user's text on screen until they choose
      if (opts.keepFocus !== false) cell.focus({ preventScroll: true });
      return;
    }
    var dirty = isDirty(cell);
    if (dirty) save(cell); // its answer re-renders the cell
    cell.classList.remove("editing");
    var ta = sourceArea(cell);
    if (ta && ta._cm) ta._cm.getInputField().blur();
    if (opts.keepFocus !== false) select(cell);
  }

  function save(cell) {
    var url = cell.dataset.url;
    if (!url || afterUploads(cell, function () { save(cell); })) return;
    htmx.ajax("POST", url + "/save", { source: cell, target: cell, swap: "outerHTML" });
  }

  // ------------------------------------------------------------------ images
  //
  // Paste (Ctrl+V), drop, or "Add image…" in a note's or prompt's editor: the files go to the
  // cell's images route, which checks them by their bytes and stores them as the message's
  // attachments (nbformat's, so a notebook export keeps them); each one's reference
  // ![name](attachment:name) goes in at the cursor and the cell's version moves on with the
  // store's, so saving the edit is not refused as stale. The listeners run in the capture phase,
  // before CodeMirror's own paste and drop (which would insert a file's bytes as text).

  function imageCell(el, orView) { // a note or prompt being edited (or any, for a drop)
    var cell = cellOf(el);
    if (!cell || !(orView || cell.classList.contains("editing"))) return null;
    var kind = cell.dataset.kind;
    return kind === "note" || kind === "prompt" ? cell : null;
  }

  function imageFiles(list) {
    return Array.prototype.filter.call(list || [], function (f) {
      return f && f.type && f.type.indexOf("image/") === 0;
    });
  }

  function insertAtCursor(cell, text) {
    var ta = sourceArea(cell);
    if (!ta) return;
    var cm = ensureEditor(ta, cell);
    if (cm) {
      var cur = cm.getCursor();
      var before = cm.getLine(cur.line).slice(0, cur.ch);
      cm.replaceSelection((before.trim() ? "\n" : "") + text + "\n", "end");
      cm.focus();
      cm.save();
    } else {
      var at = ta.selectionStart || ta.value.length;
      ta.value = ta.value.slice(0, at) + text + "\n" + ta.value.slice(ta.selectionEnd || at);
    }
  }

  // A save or a run asked for while an upload is on its way waits for it: the upload moves the
  // cell's version on, and the save must carry the reference it puts in.
  function afterUploads(cell, fn) {
    if (!cell._uploads) return false;
    (cell._afterUploads = cell._afterUploads || []).push(fn);
    return true;
  }

  // The server takes an image of at most 5 MiB (dialogue.images.MAX_IMAGE_BYTES, Claude's limit).
  // A screenshot over it (a 4K or retina screen's PNG often is) is scaled down here until it
  // fits, keeping its type where the browser can write it (else PNG), and the notice says so;
  // one the browser cannot read goes as it is, for the server to say why it refuses it.
  var MAX_IMAGE_BYTES = 5 * 1024 * 1024;

  function fitImage(f) {
    if (f.size <= MAX_IMAGE_BYTES || !window.createImageBitmap) return Promise.resolve({ file: f });
    return createImageBitmap(f).then(function (bmp) {
      var type = f.type === "image/jpeg" || f.type === "image/webp" ? f.type : "image/png";
      function attempt(scale) {
        var c = document.createElement("canvas");
        c.width = Math.max(1, Math.round(bmp.width * scale));
        c.height = Math.max(1, Math.round(bmp.height * scale));
        c.getContext("2d").drawImage(bmp, 0, 0, c.width, c.height);
        return new Promise(function (done) { c.toBlob(done, type, 0.9); }).then(function (blob) {
          if (blob && blob.size <= MAX_IMAGE_BYTES) {
            var name = (f.name || "image").replace(/\.[^.]*$/, "") + "." + type.split("/")[1].replace("jpeg", "jpg");
            return { file: new File([blob], name, { type: type }),
                     note: (f.name || "the image") + " scaled from " + bmp.width + "×" + bmp.height +
                           " to " + c.width + "×" + c.height + " to fit 5 MiB" };
          }
          return scale > 0.05 ? attempt(scale * 0.7) : { file: f };
        });
      }
      return attempt(Math.min(1, Math.sqrt(MAX_IMAGE_BYTES / f.size)));
    }, function () { return { file: f }; });
  }

  function uploadImages(cell, files) {
    var url = cell && cell.dataset.url;
    if (!url || !files.length) return;
    notice(files.length === 1 ? "Adding the image…" : "Adding " + files.length + " images…");
    cell._uploads = (cell._uploads || 0) + 1;
    function over() {
      cell._uploads -= 1;
      if (cell._uploads) return;
      var waiting = cell._afterUploads || [];
      cell._afterUploads = [];
      waiting.forEach(function (fn) { fn(); });
    }
    var notes = [];
    Promise.all(files.map(fitImage)).then(function (fitted) {
      var body = new FormData();
      fitted.forEach(function (x) {
        body.append("image", x.file, x.file.name || "image");
        if (x.note) notes.push(x.note);
      });
      var v = document.getElementById("v-" + cell.dataset.id);
      if (v) body.append("version", v.value);
      return fetch(url + "/images", { method: "POST", body: body, credentials: "same-origin",
                                      headers: { "HX-Request": "true" } });
    })
      .then(function (r) {
        return r.json().catch(function () { return { error: "The server refused the image (" + r.status + ")." }; });
      })
      .then(function (res) {
        if (res.error) { notice(res.error, "error"); return; }
        var vNow = document.getElementById("v-" + cell.dataset.id);
        if (vNow) vNow.value = String(res.version);
        insertAtCursor(cell, res.refs.join("\n"));
        notice("Added " + res.names.join(", ") + (notes.length ? " (" + notes.join("; ") + ")" : "") +
               ": it shows when you leave the editor.", "info");
      }, function () { notice("The image did not reach the server.", "error"); })
      .then(over, over);
  }

  function onPaste(e) {
    var cb = e.clipboardData;
    var files = imageFiles(cb && cb.files);
    // Text pastes as usual, also when the clipboard holds a picture of it too: Word, Excel and
    // many editors copy a selection as text and as an image; a screenshot has no text
    if (!files.length || (cb.getData("text/plain") || "").trim()) return;
    var cell = imageCell(e.target);
    if (cell) {
      e.preventDefault();
      uploadImages(cell, files);
    } else if (cellOf(e.target)) {
      notice("Images go in notes and prompts (a code cell's images are its outputs).", "error");
    }
  }

  // Files dragged over a cell are ours: on a note or prompt they go in; on another cell the
  // browser must not take them either (it would leave the page to show the file), so the drop
  // is refused with a word on where images go. Elsewhere (a file input) the browser's own way.
  function onDragOver(e) {
    var dt = e.dataTransfer;
    if (cellOf(e.target) && dt && Array.prototype.indexOf.call(dt.types || [], "Files") >= 0) {
      e.preventDefault();
      dt.dropEffect = "copy"; // what is not for this cell is refused on the drop, with a word
    }
  }

  function onDrop(e) {
    var dt = e.dataTransfer;
    if (!cellOf(e.target) || !dt || !dt.files || !dt.files.length) return;
    var cell = imageCell(e.target, true);
    var files = imageFiles(dt.files);
    if (!files.length && e.target.closest && e.target.closest(".CodeMirror")) return; // a text file: the editor inserts it
    e.preventDefault();
    if (!cell || !files.length) {
      notice(cell ? "Drop PNG, JPEG, GIF or WebP images here." :
             "Images go in notes and prompts (a code cell's images are its outputs).", "error");
      return;
    }
    if (!cell.classList.contains("editing")) enterEdit(cell);
    uploadImages(cell, files);
  }

  function onChange(e) {
    var t = e.target;
    if (!t || !t.matches || !t.matches('input[data-act="image-file"]')) return;
    var files = imageFiles(t.files);
    if (files.length) uploadImages(cellOf(t), files);
    else if (t.files && t.files.length) notice("Choose PNG, JPEG, GIF or WebP images.", "error");
    t.value = "";
  }

  function run(cell, thenNext) {
    if (!cell || afterUploads(cell, function () { run(cell, thenNext); })) return;
    var kind = cell.dataset.kind;
    if (kind === "note" || kind === "raw") {
      leaveEdit(cell, { keepFocus: false });
    } else {
      act(cell, "run");
    }
    if (thenNext) {
      var next = neighbour(cell, 1);
      if (next) select(next);
      else act(cell, "add-code-below");
    } else {
      select(cell, { focus: true });
    }
  }

  // The answer's editor arrives from the server ("Edit answer" fetches it into .answer-edit).
  function openAnswer(body) {
    var cell = cellOf(body);
    var ta = body.querySelector("textarea.answer-editor");
    if (!cell || !ta) return;
    select(cell, { focus: false });
    cell.classList.add("editing-answer");
    var cm = ensureEditor(ta, cell);
    if (cm) { cm.refresh(); cm.focus(); } else ta.focus();
  }

  // Esc leaves the answer's editor as it leaves a cell's: saving what changed (the help says
  // so); Cancel throws the edit away. A refused save's editor stays until the user chooses.
  function leaveAnswer(cell, ta) {
    if (!cell || (ta && ta.closest(".conflict"))) return;
    if (ta && ta._cm) ta._cm.save();
    if (ta && ta.value !== ta.defaultValue) act(cell, "save-answer");
    else cancelAnswer(cell);
  }

  // ------------------------------------------------------------------ Jupyter's cell keys

  function cellsUrl() {
    var b = document.querySelector('[data-act="append-code"]');
    return b ? b.getAttribute("hx-post") : null;
  }

  function copyCell(cell) {
    var ta = sourceArea(cell);
    if (ta && ta._cm) ta._cm.save();
    S.clip = { kind: cell.dataset.kind, source: ta ? ta.value : "" };
  }

  function paste(cell, where) {
    var url = cellsUrl();
    if (!S.clip || !url) { notice("Nothing to paste: copy a cell with c, or cut one with x."); return; }
    var values = { kind: S.clip.kind, paste: S.clip.source };
    if (cell) values[where] = cell.dataset.id;
    htmx.ajax("POST", url, { values: values, target: "#cells", swap: "beforeend" }).then(function () {
      var pasted = cell ? neighbour(cell, where === "after" ? 1 : -1) : allCells().slice(-1)[0];
      if (pasted) select(pasted);
    });
  }

  function merge(cell) {
    later(cell, function (c) {
      htmx.ajax("POST", c.dataset.url + "/merge", { source: c, target: c, swap: "outerHTML" });
    });
  }

  function splitAt(cell, cm) {
    cm.save();
    var at = cm.indexFromPos(cm.getCursor());
    htmx.ajax("POST", cell.dataset.url + "/split", {
      source: cell, target: cell, swap: "outerHTML", values: { at: at }
    }).then(function () {
      var first = document.getElementById("m-" + cell.dataset.id);
      var second = first && neighbour(first, 1);
      if (second) { select(second); enterEdit(second); }
    });
  }

  function runAndInsert(cell) {
    if (cell.dataset.kind === "note" || cell.dataset.kind === "raw") leaveEdit(cell, { keepFocus: false });
    else act(cell, "run");
    act(cell, "add-code-below");
  }

  function interrupt(cell) {
    var running = cell && cell.querySelector('.result.running [data-act="stop"]') ? cell
      : cellOf(document.querySelector('#cells .result.running [data-act="stop"]'));
    if (running) act(running, "stop");
    else notice("Nothing is running to interrupt.");
  }

  function cancelAnswer(cell) {
    if (!cell) return;
    cell.classList.remove("editing-answer");
    var box = cell.querySelector(".answer-edit");
    if (box) box.innerHTML = "";
    select(cell);
  }

  // ------------------------------------------------------------------ new content from htmx

  function prepare(root) {
    if (!root || !root.querySelectorAll) return;
    var cells = root.matches && root.matches("#cells > .cell") ? [root] : [];
    cells = cells.concat(Array.prototype.slice.call(root.querySelectorAll("#cells > .cell")));
    cells.forEach(function (c) {
      if (c.dataset.new) {
        delete c.dataset.new;
        select(c);
        enterEdit(c);
      } else if (c.classList.contains("editing")) { // a refused save: the user's text is here
        select(c, { focus: false });
        var cm = ensureEditor(sourceArea(c), c);
        if (cm) cm.refresh();
      } else if (S.sel === c.dataset.id) {
        c.classList.add("selected");
        attachTools(c);
        if (!editingCell() && !isTyping(document.activeElement)) c.focus({ preventScroll: true });
      }
    });
    var body = root.matches && root.matches(".answer-edit-body") ? root : root.querySelector(".answer-edit-body");
    if (body) openAnswer(body);
    // a refused answer save: the typed answer is in the conflict box, in an editor again
    var draft = root.querySelector(".conflict textarea.answer-editor");
    if (draft && cellOf(draft)) {
      var dcm = ensureEditor(draft, cellOf(draft));
      if (dcm) { dcm.refresh(); dcm.focus(); } else draft.focus();
    }
    if (root.matches && root.matches("#toast") && root.classList.contains("info")) {
      var t = root;
      clearTimeout(t._timer);
      t._timer = setTimeout(function () { if (t.isConnected) { t.innerHTML = ""; t.className = "toast"; } }, 12000);
    }
  }

  function isTyping(el) {
    return !!(el && el.closest && el.closest("input, textarea, select, .CodeMirror, [contenteditable]"));
  }

  // ------------------------------------------------------------------ keyboard

  function onKey(e) {
    var t = e.target;
    var help = document.getElementById("help");
    if (e.key === "Escape") {
      var modal = document.querySelector("#modal dialog");
      if (modal) { e.preventDefault(); document.getElementById("modal").innerHTML = ""; return; }
    }
    if (isTyping(t)) {
      var c = cellOf(t);
      if (!c || (t.closest && t.closest(".CodeMirror"))) return; // CodeMirror has its own keys
      if (t.closest(".stdin")) return; // a line for the cell's input(): Enter sends it
      if (t.classList.contains("answer-editor")) {
        if (e.key === "Escape") { e.preventDefault(); leaveAnswer(c, t); }
        return;
      }
      if (e.key === "Escape") { e.preventDefault(); leaveEdit(c); }
      else if (e.key === "Enter" && (e.shiftKey || e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        run(c, e.shiftKey);
      } else if ((e.ctrlKey || e.metaKey) && e.key === "s") { e.preventDefault(); save(c); }
      return;
    }
    if (help && help.open) return; // the dialog handles Esc itself
    if ((e.key === "Enter" || e.key === " ") && t.closest && t.closest("button, a, summary")) return;
    if (!cellsBox()) return;
    var cell = selected();
    if (e.altKey) {
      if (e.key === "Enter" && cell) { e.preventDefault(); runAndInsert(cell); }
      return;
    }
    if ((e.ctrlKey || e.metaKey) && e.key === "s") { e.preventDefault(); saved(); return; }
    if ((e.ctrlKey || e.metaKey) && e.key !== "Enter") return;
    var k = e.key;
    var now = Date.now();
    var twice = S.lastKey === k && now - S.lastKeyAt < 800;
    S.lastKey = k; S.lastKeyAt = now;

    if (k === "?") { e.preventDefault(); if (help) help.showModal(); return; }
    if (!cell) {
      var first = allCells()[0];
      if (["j", "k", "ArrowDown", "ArrowUp", "Enter"].indexOf(k) >= 0 && first) { e.preventDefault(); select(first); return; }
      if (k === "a" || k === "b") { e.preventDefault(); document.querySelector('[data-act="append-code"]').click(); }
      if (k === "z") { var u0 = document.querySelector('#toast [data-act="undo"]'); if (u0) u0.click(); }
      if (k === "v" || k === "V") { e.preventDefault(); paste(null, "after"); }
      return;
    }
    var handled = true;
    switch (k) {
      case "Enter":
        if (e.shiftKey) run(cell, true);
        else if (e.ctrlKey || e.metaKey) run(cell, false);
        else later(cell, enterEdit);
        break;
      case "j": case "ArrowDown": select(neighbour(cell, 1) || cell); break;
      case "k": case "ArrowUp": select(neighbour(cell, -1) || cell); break;
      case "J": act(cell, "down"); break;
      case "K": act(cell, "up"); break;
      case "a": act(cell, "add-code-above"); break;
      case "b": act(cell, "add-code-below"); break;
      // Jupyter's meanings: y code, m markdown (a note); c x v copy, cut, paste; Shift+M merge
      case "y": setKind(cell, "code"); break;
      case "m": case "n": setKind(cell, "note"); break;
      case "p": setKind(cell, "prompt"); break;
      case "c": copyCell(cell); notice("Copied the cell: v pastes it below, Shift+V above."); break;
      case "x":
        copyCell(cell);
        var next = neighbour(cell, 1) || neighbour(cell, -1);
        act(cell, "delete");
        if (next) select(next);
        break;
      case "v": paste(cell, "after"); break;
      case "V": paste(cell, "before"); break;
      case "M": merge(cell); break;
      case "d":
        if (twice) {
          S.lastKey = "";
          var after = neighbour(cell, 1) || neighbour(cell, -1);
          act(cell, "delete");
          if (after) S.sel = after.dataset.id, select(after);
        }
        break;
      case "z": var u = document.querySelector('#toast [data-act="undo"]'); if (u) u.click(); break;
      case "h": act(cell, "flag-hidden"); break;
      case "i": if (twice) { S.lastKey = ""; interrupt(cell); } break; // i i, as in Jupyter
      case "I": act(cell, "flag-pinned"); break;
      case "f": act(cell, "flag-collapsed"); break;
      case "e": act(cell, "flag-exported"); break;
      case "s": saved(); break; // Jupyter's save: ours is always saved
      default: handled = false;
    }
    if (handled) e.preventDefault();
  }

  function saved() { notice("Saved: every change is stored as you make it (and every version kept)."); }

  function setKind(cell, kind) {
    later(cell, function (c) {
      var sel = c.querySelector('select[data-act="kind"]');
      if (!sel || sel.value === kind) return;
      sel.value = kind;
      htmx.trigger(sel, "change");
    });
  }

  // ------------------------------------------------------------------ mouse

  function onClick(e) {
    var t = e.target;
    var ex = t.closest && t.closest("a[data-export]");
    if (ex) { e.preventDefault(); exportFile(ex); return; }
    var a = t.closest && t.closest("[data-act]");
    if (a) {
      var cellA = cellOf(a);
      switch (a.dataset.act) {
        case "help": document.getElementById("help").showModal(); return;
        case "close-help": document.getElementById("help").close(); return;
        case "close-modal": document.getElementById("modal").innerHTML = ""; return;
        case "close-toast": var ts = document.getElementById("toast"); ts.innerHTML = ""; ts.className = "toast"; return;
        case "cancel-answer": cancelAnswer(cellA); return;
        case "reconnect": C.tries = 0; probeIn(0); return;
      }
      if (a.closest(".cell-menu") && a.classList.contains("menu-item")) {
        var d = a.closest("details"); if (d) d.open = false;
      }
      if (cellA) select(cellA, { focus: false, scroll: false });
      return;
    }
    var cell = cellOf(t);
    if (!cell) return;
    if (isTyping(t) || (t.closest && t.closest("a, button, summary, iframe"))) { select(cell, { focus: false, scroll: false }); return; }
    var view = t.closest && t.closest(".view");
    if (view && (cell.dataset.kind === "code" || view.querySelector(".placeholder"))) { enterEdit(cell); return; }
    if (!cell.classList.contains("editing")) select(cell, { scroll: false });
  }

  function onHover(e) {
    var cell = cellOf(e.target);
    var t = tools();
    if (!cell || !t || t.parentNode === cell) return;
    if (t.querySelector("details[open]")) return; // a menu is open: leave it where it is
    attachTools(cell);
  }

  function onDblClick(e) {
    var cell = cellOf(e.target);
    if (cell && e.target.closest(".view")) enterEdit(cell);
  }

  function onMouseDown(e) {
    var ed = editingCell();
    if (!ed) return;
    var t = e.target;
    if (ed.contains(t)) return;
    if (t.closest && t.closest("#toast, #modal, dialog")) return;
    leaveEdit(ed, { keepFocus: false });
  }

  // ------------------------------------------------------------------ the connection to the server
  //
  // A page must never spin forever at a server that is gone (killed, crashed, restarted). Any
  // sign of trouble (an event stream's error, a request that got no answer) makes the page ask
  // /health; while nothing answers, a banner says so and the page asks again with backoff. When
  // the server answers again the banner goes, and the cells that were running are fetched anew:
  // a run still going re-attaches to its stream (the server's relay replays what it missed), one
  // that died with the server shows what the store kept of it.

  var C = {
    down: false, timer: null, probing: false, tries: 0, instance: null,
    errored: {},      // cell ids whose stream failed since the last probe
    refreshes: {},    // cell id -> refreshes in a row without its stream opening (backoff)
    lost: false       // a change the user asked for never reached the server
  };
  var BACKOFF_MS = [500, 1000, 2000, 3000, 5000];
  var PROBE_TIMEOUT_MS = 5000;

  function connBanner() {
    var b = document.getElementById("conn");
    if (b) return b;
    b = document.createElement("div");
    b.id = "conn";
    b.setAttribute("role", "alert");
    b.hidden = true;
    var dot = document.createElement("span"); dot.className = "conn-dot";
    var text = document.createElement("span"); text.className = "conn-text";
    var retry = document.createElement("button");
    retry.type = "button"; retry.dataset.act = "reconnect"; retry.textContent = "Retry now";
    b.append(dot, text, retry);
    document.body.appendChild(b);
    return b;
  }

  function showDown(text) {
    var b = connBanner();
    b.querySelector(".conn-text").textContent = text;
    b.hidden = false;
    document.body.classList.add("offline");
    C.down = true;
  }

  function showUp() {
    var b = document.getElementById("conn");
    if (b) b.hidden = true;
    document.body.classList.remove("offline");
  }

  function probeIn(ms) {
    clearTimeout(C.timer);
    C.timer = setTimeout(probe, ms);
  }

  // Something failed: check (once for a burst of errors; the backoff timer runs while down).
  function suspect(cellId) {
    if (cellId) C.errored[cellId] = true;
    if (C.down || C.probing || C.timer) return;
    probeIn(200);
  }

  function probe() {
    clearTimeout(C.timer);
    C.timer = null;
    if (C.probing) return;
    C.probing = true;
    var ctl = new AbortController();
    var t = setTimeout(function () { ctl.abort(); }, PROBE_TIMEOUT_MS);
    fetch("/health", { cache: "no-store", credentials: "same-origin", signal: ctl.signal })
      .then(function (r) {
        if (!r.ok) throw { status: r.status };
        return r.json();
      })
      .then(function (h) { clearTimeout(t); C.probing = false; reachable(h || {}); },
            function (e) { clearTimeout(t); C.probing = false; unreachable(e && e.status); });
  }

  function unreachable(status) {
    showDown(status === 401
      ? "The server no longer accepts this page's token (it restarted with a new one): open the URL it printed."
      : "Disconnected from the server: reconnecting…");
    probeIn(BACKOFF_MS[Math.min(C.tries, BACKOFF_MS.length - 1)]);
    C.tries += 1;
  }

  function reachable(h) {
    var restarted = C.instance !== null && h.instance !== C.instance;
    var wasDown = C.down;
    C.instance = h.instance || null;
    C.down = false;
    C.tries = 0;
    showUp();
    var errored = C.errored;
    C.errored = {};
    document.querySelectorAll("#cells .result.running").forEach(function (r) {
      var id = r.id.slice(2);
      if (wasDown || restarted || errored[id]) refreshCell(id);
    });
    if (wasDown && C.lost) {
      C.lost = false;
      notice("Reconnected. Something you did while the server was away did not reach it: please do it again.");
    }
  }

  // Fetch a running cell's current state from the server. The cell's own answer replaces it
  // (with a fresh event stream if it still runs); a cell being edited keeps its editor and gets
  // its result, gutter and version (so saving the edit is not refused as stale).
  function refreshCell(id) {
    var cell = document.getElementById("m-" + id);
    if (!cell || !cell.dataset.url) return;
    var n = C.refreshes[id] = (C.refreshes[id] || 0) + 1;
    var wait = n > 1 ? Math.min(30000, 1000 * Math.pow(2, n - 2)) : 0; // a stream failing over and over
    setTimeout(function () {
      var c = document.getElementById("m-" + id);
      if (!c) return;
      if (c.classList.contains("editing") || c.classList.contains("editing-answer")) {
        htmx.ajax("GET", c.dataset.url, {
          target: "#r-" + id, swap: "outerHTML", select: "#r-" + id,
          selectOOB: "#g-" + id + ":outerHTML,#v-" + id + ":outerHTML"
        });
      } else {
        htmx.ajax("GET", c.dataset.url, { source: c, target: c, swap: "outerHTML" });
      }
    }, wait);
  }

  // An export is fetched, not followed: a refusal (a module with no exported cell) is told in a
  // toast and the page stays; a note from the server (hidden cells left out) is told beside the
  // download.
  function exportFile(link) {
    var menu = link.closest("details");
    var keep = menu && menu.querySelector("[data-export-hidden]");
    var url = link.getAttribute("href") + (keep && keep.checked ? (link.getAttribute("href").indexOf("?") < 0 ? "?" : "&") + "hidden=1" : "");
    if (menu) menu.open = false;
    fetch(url, { headers: { "HX-Request": "true" }, credentials: "same-origin" }).then(function (r) {
      if (!r.ok) {
        return r.text().then(function (body) {
          var doc = new DOMParser().parseFromString(body, "text/html");
          var why = doc.querySelector(".toast-text");
          notice(why ? why.textContent : "The export failed (" + r.status + ").", "error");
        });
      }
      var cd = r.headers.get("Content-Disposition") || "";
      var m = /filename="([^"]+)"/.exec(cd);
      var note = r.headers.get("X-Dialogue-Note");
      return r.blob().then(function (blob) {
        var a = document.createElement("a");
        a.href = URL.createObjectURL(blob);
        a.download = m ? m[1] : "dialogue." + link.dataset.export;
        document.body.appendChild(a);
        a.click();
        a.remove();
        setTimeout(function () { URL.revokeObjectURL(a.href); }, 10000);
        if (note) notice(decodeURIComponent(note));
      });
    }).catch(function () { notice("The export did not reach the server.", "error"); });
  }

  // The model's document tools (or a cell's script) changed a cell that is open in an editor
  // here: keep the cell and the typing; a save then meets the new version as a conflict, which
  // shows both. A run of it still swaps in (the editor closes as for any run).
  function keepEditedCell(e) {
    var f = e.detail.fragment, first = f && f.firstElementChild;
    if (!first || !first.dataset || !first.dataset.doc) return false;
    var op = first.dataset.doc, id = first.dataset.id || first.id.replace(/^m-/, "");
    if (first.tagName === "SPAN") first.remove(); // a marker, not content
    var cell = document.getElementById("m-" + id);
    if (op === "run" || op === "add" || !cell || !(cell.classList.contains("editing") ||
                                                   cell.classList.contains("editing-answer"))) return false;
    e.detail.shouldSwap = false;
    // the change came from the model's tools or from a cell's script (dialogue.here)
    notice(op === "delete" ? "The cell you are editing was moved to the trash elsewhere; your text is kept here."
                           : op === "move" ? "The cell you are editing was moved elsewhere; it stays here until you save."
                           : "The cell you are editing was changed elsewhere; saving shows both versions.", "info");
    return true;
  }

  function notice(text, level) {
    var t = document.getElementById("toast");
    if (!t) return;
    var span = document.createElement("span");
    span.className = "toast-text";
    span.textContent = text;
    var close = document.createElement("button");
    close.type = "button"; close.className = "toast-close"; close.dataset.act = "close-toast";
    close.setAttribute("aria-label", "close"); close.textContent = "×";
    t.replaceChildren(span, close);
    t.className = "toast " + (level || "info");
    t.setAttribute("role", level === "error" ? "alert" : "status");
  }

  function streamCellId(el) {
    var r = el && el.closest ? el.closest(".result.running") : null;
    return r && r.id.indexOf("r-") === 0 ? r.id.slice(2) : null;
  }

  function watchConnection() {
    var body = document.body;
    body.addEventListener("htmx:sseError", function (e) { suspect(streamCellId(e.target)); });
    body.addEventListener("htmx:sseOpen", function (e) {
      var id = streamCellId(e.target);
      if (id) delete C.refreshes[id];
    });
    body.addEventListener("htmx:sendError", function (e) {
      var v = e.detail && e.detail.requestConfig && e.detail.requestConfig.verb;
      if (v && v.toLowerCase() !== "get") C.lost = true;
      suspect(null);
    });
    body.addEventListener("htmx:timeout", function () { suspect(null); });
    window.addEventListener("online", function () { if (C.down) probeIn(0); });
  }

  // ------------------------------------------------------------------ moves, leaving the page

  function onMoved(e) {
    var d = e.detail || {};
    var el = document.getElementById("m-" + d.id);
    var box = cellsBox();
    if (!el || !box) return;
    if (d.after) {
      var a = document.getElementById("m-" + d.after);
      if (a) a.after(el);
    } else {
      box.prepend(el);
    }
    var ta = sourceArea(el);
    if (ta && ta._cm) ta._cm.refresh();
    if (S.sel === d.id) select(el, { focus: !el.classList.contains("editing") });
  }

  // A running cell's output scrolls in a box (app.css; render.py's .output-long once it is
  // done): show its end as it grows, as Jupyter does.
  function followOutput(elt) {
    if (!elt.closest || !elt.closest(".result.running")) return;
    var own = elt.closest("pre.output");
    var pres = own ? [own] : Array.prototype.slice.call(elt.querySelectorAll("pre.output"));
    pres.forEach(function (pre) { pre.scrollTop = pre.scrollHeight; });
  }

  function onBeforeUnload(e) {
    var dirty = allCells().some(function (c) { return c.classList.contains("editing") && isDirty(c); });
    if (dirty) { e.preventDefault(); e.returnValue = ""; }
  }

  function start() {
    document.addEventListener("keydown", onKey);
    document.addEventListener("click", onClick);
    document.addEventListener("dblclick", onDblClick);
    document.addEventListener("mousedown", onMouseDown, true);
    document.addEventListener("input", function (e) { // the plain textarea, without CodeMirror
      if (e.target.matches && e.target.matches(".src textarea.editor")) estimateSoon(cellOf(e.target));
    });
    document.addEventListener("paste", onPaste, true);
    document.addEventListener("dragover", onDragOver, true);
    document.addEventListener("drop", onDrop, true);
    document.addEventListener("change", onChange);
    document.body.addEventListener("dlgMoved", onMoved);
    document.body.addEventListener("htmx:beforeRequest", onBeforeRequest);
    document.body.addEventListener("htmx:configRequest", onConfigRequest);
    document.body.addEventListener("htmx:beforeSwap", function (e) { rescueTools(e.detail.target); });
    document.body.addEventListener("htmx:oobBeforeSwap", function (e) {
      if (keepEditedCell(e)) return;
      rescueTools(e.detail.target);
    });
    document.addEventListener("mouseover", onHover);
    document.body.addEventListener("htmx:afterRequest", onAfterRequest);
    window.addEventListener("beforeunload", onBeforeUnload);
    watchConnection();
    htmx.onLoad(prepare);
    htmx.onLoad(followOutput);
    var target = location.hash && document.getElementById(location.hash.slice(1));
    if (target && cellOf(target) === target) select(target);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
