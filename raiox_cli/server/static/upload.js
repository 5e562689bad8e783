// Upload page: drop a file on the box, preview it, drag a crop box over it.
// Without JavaScript the form still works: the file input, and the crop fields (in
// percent) stay visible; only the preview to drag a box over needs a script.
(function () {
  "use strict";
  var input = document.getElementById("file");
  var drop = document.getElementById("drop");
  var stage = document.getElementById("stage");
  var preview = document.getElementById("preview");
  var box = document.getElementById("box");
  var noPreview = document.getElementById("no-preview");
  var fields = ["x", "y", "w", "h"].map(function (n) { return document.getElementById("crop_" + n); });
  var url = null;
  if (!input || !stage) return;

  function show(file) {
    if (url) URL.revokeObjectURL(url);
    clearBox();
    if (!file) { stage.hidden = true; noPreview.hidden = true; return; }
    url = URL.createObjectURL(file);
    preview.onload = function () { stage.hidden = false; noPreview.hidden = true; };
    preview.onerror = function () { stage.hidden = true; noPreview.hidden = false; };
    preview.src = url;
  }
  input.addEventListener("change", function () { show(input.files[0]); });

  ["dragenter", "dragover"].forEach(function (type) {
    drop.addEventListener(type, function (e) { e.preventDefault(); drop.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (type) {
    drop.addEventListener(type, function () { drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (e) {
    e.preventDefault();
    if (e.dataTransfer && e.dataTransfer.files.length) {
      input.files = e.dataTransfer.files;
      show(input.files[0]);
    }
  });

  function clamp(v) { return Math.max(0, Math.min(100, v)); }
  function point(e) {
    var r = preview.getBoundingClientRect();
    return { x: clamp((e.clientX - r.left) / r.width * 100), y: clamp((e.clientY - r.top) / r.height * 100) };
  }
  function draw(x, y, w, h) {
    box.style.left = x + "%"; box.style.top = y + "%";
    box.style.width = w + "%"; box.style.height = h + "%";
    box.hidden = !(w > 0 && h > 0);
  }
  function write(x, y, w, h) {
    [x, y, w, h].forEach(function (v, i) { fields[i].value = v.toFixed(1); });
    draw(x, y, w, h);
  }
  function clearBox() {
    fields.forEach(function (f) { f.value = ""; });
    box.hidden = true;
  }
  var start = null;
  stage.addEventListener("pointerdown", function (e) {
    e.preventDefault();
    start = point(e);
    stage.setPointerCapture(e.pointerId);
  });
  stage.addEventListener("pointermove", function (e) {
    if (!start) return;
    var p = point(e);
    write(Math.min(start.x, p.x), Math.min(start.y, p.y), Math.abs(p.x - start.x), Math.abs(p.y - start.y));
  });
  stage.addEventListener("pointerup", function () {
    start = null;
    if (parseFloat(fields[2].value) < 1 || parseFloat(fields[3].value) < 1) clearBox();
  });
  fields.forEach(function (f) {
    f.addEventListener("input", function () {
      var v = fields.map(function (g) { return parseFloat(g.value) || 0; });
      draw(v[0], v[1], v[2], v[3]);
    });
  });
  document.getElementById("crop-clear").addEventListener("click", clearBox);
})();
