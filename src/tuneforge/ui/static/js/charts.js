// Line charts by training step on uPlot (vendored under vendor/uplot, loaded before this module).

import {h, replace} from "./dom.js";

const COLORS = ["#2f6fde", "#d9480f", "#1f8a4c", "#7048e8", "#c2255c", "#0c8599"];

/**
 * A chart of some metrics against step. `series` are metric names ("train_loss"); points arrive with
 * add(step, values) and missing values leave gaps. The figure's data-points attribute counts the steps
 * plotted (what the browser tests watch).
 */
export class StepChart {
  constructor(title, series, {yLabel = ""} = {}) {
    this.series = series;
    this.steps = [];
    this.columns = series.map(() => []);
    this.body = h("div", {class: "empty"}, "No points yet.");
    this.figure = h("figure", {class: "chart", dataset: {chart: title.toLowerCase(), points: "0"}},
                    h("figcaption", {}, title), this.body);
    this.yLabel = yLabel;
    this.plot = null;
    this.pending = false;
  }

  /** Record the values of one step (a later point for the same step replaces its values). */
  add(step, values) {
    const wanted = this.series.map((name) => (typeof values[name] === "number" && Number.isFinite(values[name])
      ? values[name] : null));
    if (wanted.every((v) => v === null)) return;
    let at = this.steps.length;
    while (at > 0 && this.steps[at - 1] > step) at -= 1;
    if (at > 0 && this.steps[at - 1] === step) {
      wanted.forEach((v, i) => { if (v !== null) this.columns[i][at - 1] = v; });
    } else {
      this.steps.splice(at, 0, step);
      wanted.forEach((v, i) => this.columns[i].splice(at, 0, v));
    }
    this.scheduleDraw();
  }

  // Many events arrive at once when a page opens on a long job: draw once per animation frame.
  scheduleDraw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.draw(); });
  }

  draw() {
    this.figure.dataset.points = String(this.steps.length);
    const data = [this.steps, ...this.columns];
    if (this.plot) { this.plot.setData(data); return; }
    const width = Math.max(320, (this.figure.clientWidth || 420) - 20);
    const options = {
      width, height: 220,
      scales: {x: {time: false}},
      axes: [{label: "step"}, {label: this.yLabel, size: 60}],
      series: [{label: "step"}, ...this.series.map((name, i) => ({
        label: name, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
        points: {show: this.steps.length < 60},
      }))],
    };
    const holder = h("div", {});
    replace(this.body, holder);
    this.body.className = "";
    this.plot = new window.uPlot(options, data, holder);
  }

  get element() { return this.figure; }
}
