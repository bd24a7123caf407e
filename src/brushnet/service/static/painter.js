// Mask painting on a canvas laid over the image: brush, eraser, undo, clear, invert, load a mask.
//
// The mask canvas has the image's pixel size. Painted pixels are opaque (in the mask colour), the rest
// transparent; `toMaskBlob()` exports white = inpaint, black = keep, which is the server's convention.

const UNDO_LIMIT = 30;

export class MaskPainter {
  /**
   * @param {HTMLCanvasElement} canvas  the mask canvas (overlaid on the image canvas)
   * @param {HTMLElement} cursor        a circle that follows the pointer, showing the brush size
   * @param {(painter: MaskPainter) => void} onChange  called after every stroke or edit
   */
  constructor(canvas, cursor, onChange) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d", { willReadFrequently: true });
    this.cursor = cursor;
    this.onChange = onChange;
    this.color = "#ff3d7f";
    this.size = 40; // brush diameter in screen pixels
    this.erasing = false;
    this.undoStack = [];
    this.drawing = false;
    this.last = null;
    this.pointerId = null;
    canvas.addEventListener("pointerdown", (e) => this.#down(e));
    canvas.addEventListener("pointermove", (e) => this.#move(e));
    canvas.addEventListener("pointerup", (e) => this.#up(e));
    canvas.addEventListener("pointercancel", (e) => this.#up(e));
    canvas.addEventListener("pointerleave", () => { if (!this.drawing) this.cursor.hidden = true; });
    canvas.addEventListener("pointerenter", (e) => this.#showCursor(e));
  }

  /** Start over on a new image of `width` x `height` pixels (empty mask, no undo history). */
  reset(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.undoStack = [];
    this.ctx.clearRect(0, 0, width, height);
    this.onChange(this);
  }

  get canUndo() { return this.undoStack.length > 0; }

  /** True when at least one pixel is painted. */
  hasMask() {
    const data = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i] >= 128) return true;
    return false;
  }

  /** Fraction of the image that is painted, in [0, 1]. */
  coverage() {
    const data = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height).data;
    let painted = 0;
    for (let i = 3; i < data.length; i += 4) if (data[i] >= 128) painted++;
    return painted / (data.length / 4 || 1);
  }

  undo() {
    const previous = this.undoStack.pop();
    if (previous) {
      this.ctx.putImageData(previous, 0, 0);
      this.onChange(this);
    }
  }

  clear() {
    this.#snapshot();
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.onChange(this);
  }

  invert() {
    this.#snapshot();
    this.#setFromAlpha((alpha) => alpha < 128);
  }

  /** Replace the mask with an image where white = inpaint (must have the image's size). */
  loadMask(img) {
    const { width, height } = this.canvas;
    const scratch = document.createElement("canvas");
    scratch.width = width;
    scratch.height = height;
    const sctx = scratch.getContext("2d", { willReadFrequently: true });
    sctx.drawImage(img, 0, 0, width, height);
    const src = sctx.getImageData(0, 0, width, height).data;
    // Masks exported by painting tools are often a transparent layer: then the alpha is the mask.
    let opaque = true;
    for (let i = 3; i < src.length; i += 4) if (src[i] < 255) { opaque = false; break; }
    this.#snapshot();
    this.#setFromPixels((i) => {
      const grey = (src[i] + src[i + 1] + src[i + 2]) / 3;
      return opaque ? grey >= 128 : src[i + 3] >= 128;
    });
  }

  /** The mask as a PNG blob: white = inpaint, black = keep, the image's size. */
  toMaskBlob() {
    const { width, height } = this.canvas;
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const octx = out.getContext("2d");
    const src = this.ctx.getImageData(0, 0, width, height).data;
    const dst = octx.createImageData(width, height);
    for (let i = 0; i < src.length; i += 4) {
      const v = src[i + 3] >= 128 ? 255 : 0;
      dst.data[i] = dst.data[i + 1] = dst.data[i + 2] = v;
      dst.data[i + 3] = 255;
    }
    octx.putImageData(dst, 0, 0);
    return new Promise((resolve) => out.toBlob(resolve, "image/png"));
  }

  // ------------------------------------------------------------------ internals

  #scale() {
    const rect = this.canvas.getBoundingClientRect();
    return { rect, sx: this.canvas.width / rect.width, sy: this.canvas.height / rect.height };
  }

  #point(e) {
    const { rect, sx, sy } = this.#scale();
    return { x: (e.clientX - rect.left) * sx, y: (e.clientY - rect.top) * sy };
  }

  #showCursor(e) {
    const rect = this.canvas.getBoundingClientRect();
    const style = this.cursor.style;
    style.width = style.height = `${this.size}px`;
    style.left = `${e.clientX - rect.left}px`;
    style.top = `${e.clientY - rect.top}px`;
    this.cursor.classList.toggle("eraser", this.erasing);
    this.cursor.hidden = e.pointerType === "touch";
  }

  #snapshot() {
    this.undoStack.push(this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height));
    if (this.undoStack.length > UNDO_LIMIT) this.undoStack.shift();
  }

  #down(e) {
    if (e.button !== 0 || this.drawing) return;
    e.preventDefault();
    this.canvas.setPointerCapture(e.pointerId);
    this.pointerId = e.pointerId;
    this.#snapshot();
    this.drawing = true;
    this.last = this.#point(e);
    this.#stroke(this.last, this.last);
  }

  #move(e) {
    this.#showCursor(e);
    if (!this.drawing || e.pointerId !== this.pointerId) return;
    e.preventDefault();
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
    for (const ev of events.length ? events : [e]) {
      const p = this.#point(ev);
      this.#stroke(this.last, p);
      this.last = p;
    }
  }

  #up(e) {
    if (!this.drawing || e.pointerId !== this.pointerId) return;
    this.drawing = false;
    this.pointerId = null;
    this.onChange(this);
  }

  #stroke(from, to) {
    const { sx } = this.#scale();
    const ctx = this.ctx;
    ctx.save();
    ctx.globalCompositeOperation = this.erasing ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = this.color;
    ctx.lineWidth = Math.max(1, this.size * sx);
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x + 0.01, to.y);
    ctx.stroke();
    ctx.restore();
  }

  #setFromAlpha(test) {
    const { width, height } = this.canvas;
    const alpha = this.ctx.getImageData(0, 0, width, height).data;
    this.#setFromPixels((i) => test(alpha[i + 3]));
  }

  #setFromPixels(isHole) {
    const { width, height } = this.canvas;
    const out = this.ctx.createImageData(width, height);
    const [r, g, b] = hexToRgb(this.color);
    for (let i = 0; i < out.data.length; i += 4) {
      if (isHole(i)) {
        out.data[i] = r; out.data[i + 1] = g; out.data[i + 2] = b; out.data[i + 3] = 255;
      }
    }
    this.ctx.putImageData(out, 0, 0);
    this.onChange(this);
  }
}

function hexToRgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}
