// Charts: uPlot for the metric series (built for large time series), a small SVG sparkline for the job list.

import uPlot from "uplot";

const SVG = "http://www.w3.org/2000/svg";
// Steps are whole numbers: the x axis ticks at 1, 2, 5, 10, 20, 50, ... never between steps.
const STEP_INCREMENTS = Array.from({ length: 24 }, (_, i) => [1, 2, 5][i % 3] * 10 ** Math.floor(i / 3));

export function sparkline(values: number[], width = 110, height = 28): SVGSVGElement {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", String(width));
  svg.setAttribute("height", String(height));
  svg.setAttribute("class", "sparkline");
  svg.setAttribute("data-points", String(values.length));
  const finite = values.filter(Number.isFinite);
  if (finite.length < 2) return svg;
  const min = Math.min(...finite);
  const max = Math.max(...finite);
  const span = max - min || 1;
  const step = (width - 2) / (values.length - 1);
  const points = values
    .map((v, i) => (Number.isFinite(v) ? `${(1 + i * step).toFixed(1)},${(1 + (height - 2) * (1 - (v - min) / span)).toFixed(1)}` : ""))
    .filter(Boolean)
    .join(" ");
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", points);
  svg.append(line);
  return svg;
}

/** One metric's chart: points by step, kept sorted and de-duplicated (a replayed stream rewrites a step). */
export class MetricChart {
  readonly el: HTMLElement;
  private readonly points = new Map<number, number>();
  private plot: uPlot | null = null;
  private logScale = false;
  private readonly plotBox: HTMLElement;
  private readonly lastLabel: HTMLElement;
  private readonly note: HTMLElement;

  constructor(
    readonly name: string,
    private readonly syncKey: string,
  ) {
    this.el = document.createElement("section");
    this.el.className = "chart";
    this.el.dataset.metric = name;
    this.el.dataset.testid = `chart-${name}`;
    const title = document.createElement("h3");
    title.textContent = name;
    this.lastLabel = document.createElement("span");
    this.lastLabel.className = "muted last";
    title.append(" ", this.lastLabel);
    this.plotBox = document.createElement("div");
    this.note = document.createElement("p");
    this.note.className = "muted chart-note";
    this.el.append(title, this.note, this.plotBox);
  }

  add(step: number, value: number): void {
    this.points.set(step, value);
  }

  get size(): number {
    return this.points.size;
  }

  setLogScale(on: boolean): void {
    if (on === this.logScale) return;
    this.logScale = on;
    this.zoomed = false; // a new plot starts showing every step
    this.plot?.destroy();
    this.plot = null;
    this.draw();
  }

  private data(): uPlot.AlignedData {
    const steps = [...this.points.keys()].sort((a, b) => a - b);
    // A log scale can't show zero or below: leave those points out rather than break the axis.
    const values = steps.map((s) => {
      const v = this.points.get(s)!;
      return this.logScale && v <= 0 ? null : v;
    });
    return [steps, values];
  }

  draw(): void {
    const data = this.data();
    this.el.dataset.points = String(data[0].length);
    const raw = [...this.points.values()];
    this.lastLabel.textContent = raw.length ? `last ${formatTick(this.points.get(data[0][data[0].length - 1])!)}` : "";
    this.note.textContent =
      this.logScale && raw.some((v) => v <= 0)
        ? raw.every((v) => v <= 0)
          ? "No positive value to show on a log scale."
          : "Values at or below zero are left out on a log scale."
        : "";
    const width = Math.max(240, this.plotBox.clientWidth || this.el.clientWidth - 24);
    if (this.plot) {
      // Keep the user's zoom: only redraw the data while zoomed.
      this.plot.setData(data, !this.zoomed);
      if (Math.abs(this.plot.width - width) > 4) this.plot.setSize({ width, height: 220 });
      return;
    }
    this.plot = new uPlot(
      {
        width,
        height: 220,
        cursor: { sync: { key: this.syncKey }, drag: { x: true, y: false } },
        legend: { show: false },
        scales: { x: { time: false }, y: this.logScale ? { distr: 3 } : {} },
        axes: [
          { label: "step", stroke: "#667", grid: { stroke: "#eceef2" }, incrs: STEP_INCREMENTS },
          { stroke: "#667", size: 60, values: (_u, ticks) => ticks.map(formatTick), grid: { stroke: "#eceef2" } },
        ],
        series: [{}, { label: this.name, stroke: "#3b6fd8", width: 1.5, spanGaps: true, points: { show: false } }],
        hooks: {
          // Zoomed while the x scale shows less than every step (a drag zooms in, a double-click zooms out).
          setScale: [
            (u, key) => {
              if (key !== "x") return;
              const xs = u.data[0];
              const { min = 0, max = 0 } = u.scales.x;
              const zoomed = xs.length > 1 && (min > xs[0] || max < xs[xs.length - 1]);
              this.zoomed = zoomed;
              this.el.dataset.zoomed = String(zoomed);
            },
          ],
        },
      },
      data,
      this.plotBox,
    );
  }

  private zoomed = false;

  resize(): void {
    if (!this.plot) return;
    const width = Math.max(240, this.plotBox.clientWidth);
    this.plot.setSize({ width, height: 220 });
  }

  destroy(): void {
    this.plot?.destroy();
  }
}

function formatTick(v: number | null): string {
  if (v === null) return "";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
  return String(Number(v.toPrecision(4)));
}
