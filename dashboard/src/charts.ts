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

/** What the metric charts share: a titled card holding a uPlot of values by step, a log scale option, zoom by
 * dragging across steps (kept while new points arrive) and a double-click to see every step again. */
abstract class StepChart {
  readonly el: HTMLElement;
  protected plot: uPlot | null = null;
  protected logScale = false;
  protected zoomed = false;
  protected readonly title: HTMLElement;
  protected readonly note: HTMLElement;
  private readonly plotBox: HTMLElement;

  constructor(
    readonly name: string,
    private readonly syncKey: string,
    testid: string,
    private readonly height: number,
  ) {
    this.el = document.createElement("section");
    this.el.className = "chart";
    this.el.dataset.metric = name;
    this.el.dataset.testid = testid;
    this.title = document.createElement("h3");
    this.title.textContent = name;
    this.note = document.createElement("p");
    this.note.className = "muted chart-note";
    this.plotBox = document.createElement("div");
    this.el.append(this.title, this.note, this.plotBox);
  }

  protected abstract data(): uPlot.AlignedData;
  protected abstract series(): uPlot.Series[];
  protected abstract showsLegend(): boolean;
  /** Said above the plot: which values a log scale leaves out. */
  protected abstract logScaleNote(): string;

  setLogScale(on: boolean): void {
    if (on === this.logScale) return;
    this.logScale = on;
    this.rebuild();
  }

  /** A new plot (new series or scale), showing every step. */
  protected rebuild(): void {
    this.zoomed = false;
    this.plot?.destroy();
    this.plot = null;
    this.draw();
  }

  draw(): void {
    const data = this.data();
    this.note.textContent = this.logScale ? this.logScaleNote() : "";
    const width = Math.max(240, this.plotBox.clientWidth || this.el.clientWidth - 24);
    if (this.plot) {
      this.plot.setData(data, !this.zoomed); // new points keep the user's zoom
      if (Math.abs(this.plot.width - width) > 4) this.plot.setSize({ width, height: this.height });
      return;
    }
    this.plot = new uPlot(
      {
        width,
        height: this.height,
        cursor: { sync: { key: this.syncKey }, drag: { x: true, y: false } },
        legend: this.showsLegend() ? { show: true, live: true } : { show: false },
        scales: { x: { time: false }, y: this.logScale ? { distr: 3 } : {} },
        axes: [{ label: "step", stroke: "#667", grid: { stroke: "#eceef2" }, incrs: STEP_INCREMENTS }, VALUE_AXIS],
        series: this.series(),
        hooks: {
          // Zoomed while the x scale shows less than every step (a drag zooms in, a double-click zooms out).
          setScale: [
            (u, key) => {
              if (key !== "x") return;
              const xs = u.data[0];
              const { min = 0, max = 0 } = u.scales.x;
              this.zoomed = xs.length > 1 && (min > xs[0] || max < xs[xs.length - 1]);
              this.el.dataset.zoomed = String(this.zoomed);
            },
          ],
        },
      },
      data,
      this.plotBox,
    );
  }

  resize(): void {
    this.plot?.setSize({ width: Math.max(240, this.plotBox.clientWidth), height: this.height });
  }

  destroy(): void {
    this.plot?.destroy();
  }
}

/** One metric's chart: points by step, kept sorted and de-duplicated (a replayed stream rewrites a step). */
export class MetricChart extends StepChart {
  private readonly points = new Map<number, number>();
  private smoothing = 0;
  private readonly lastLabel: HTMLElement;

  constructor(name: string, syncKey: string) {
    super(name, syncKey, `chart-${name}`, 220);
    this.lastLabel = document.createElement("span");
    this.lastLabel.className = "muted last";
    this.title.append(" ", this.lastLabel);
  }

  add(step: number, value: number): void {
    this.points.set(step, value);
  }

  get size(): number {
    return this.points.size;
  }

  /** EMA weight 0..0.99 for the drawn line; the raw points stay as a faint line under it. */
  setSmoothing(weight: number): void {
    this.smoothing = Math.min(0.99, Math.max(0, weight));
    this.el.dataset.smoothing = String(this.smoothing);
    if (this.plot) this.plot.setData(this.data(), !this.zoomed);
  }

  protected data(): uPlot.AlignedData {
    const steps = [...this.points.keys()].sort((a, b) => a - b);
    const raw = steps.map((s) => this.points.get(s)!);
    // A log scale can't show zero or below: leave those points out rather than break the axis.
    const shown = (v: number | null) => (v === null || (this.logScale && v <= 0) ? null : v);
    return [steps, raw.map(shown), ema(raw, this.smoothing).map(shown)];
  }

  protected series(): uPlot.Series[] {
    return [
      {},
      { label: `${this.name} (raw)`, stroke: "rgba(59,111,216,0.28)", width: 1, spanGaps: true, points: { show: false } },
      { label: this.name, stroke: "#3b6fd8", width: 1.5, spanGaps: true, points: { show: false } },
    ];
  }

  protected showsLegend(): boolean {
    return false;
  }

  protected logScaleNote(): string {
    const raw = [...this.points.values()];
    if (!raw.some((v) => v <= 0)) return "";
    return raw.every((v) => v <= 0)
      ? "No positive value to show on a log scale."
      : "Values at or below zero are left out on a log scale.";
  }

  draw(): void {
    this.el.dataset.points = String(this.points.size);
    const last = Math.max(...this.points.keys());
    this.lastLabel.textContent = this.points.size ? `last ${formatTick(this.points.get(last)!)}` : "";
    super.draw();
  }
}

/** Exponential moving average, debiased as TensorBoard's smoothing is (the first points aren't pulled to 0). */
export function ema(values: number[], weight: number): (number | null)[] {
  if (weight <= 0) return values.slice();
  let last = 0;
  let n = 0;
  return values.map((v) => {
    if (!Number.isFinite(v)) return null;
    n += 1;
    last = last * weight + (1 - weight) * v;
    return last / (1 - weight ** n);
  });
}

/** Distinct colours for runs drawn together (one per job on the Compare page). */
export const RUN_COLORS = ["#3b6fd8", "#d8623b", "#2e9e5b", "#9b4fd0", "#c9a227", "#1aa3b8", "#d03f8a", "#6b7385"];

export interface Run {
  label: string;
  points: [number, number][];
}

/** One metric with several runs overlaid (one line and legend entry each, over the union of their steps). */
export class OverlayChart extends StepChart {
  private runs: Run[] = [];

  constructor(name: string, syncKey: string) {
    super(name, syncKey, `compare-chart-${name}`, 240);
  }

  set(runs: Run[]): void {
    const sameRuns = runs.length === this.runs.length && runs.every((r, i) => r.label === this.runs[i].label);
    this.runs = runs;
    this.el.dataset.series = String(runs.length);
    this.el.dataset.points = runs.map((r) => r.points.length).join(",");
    if (!sameRuns) this.rebuild();
    else this.draw();
  }

  protected data(): uPlot.AlignedData {
    const steps = [...new Set(this.runs.flatMap((r) => r.points.map((p) => p[0])))].sort((a, b) => a - b);
    const columns = this.runs.map((r) => {
      const byStep = new Map(r.points);
      return steps.map((s) => {
        const v = byStep.get(s);
        return v === undefined || (this.logScale && v <= 0) ? null : v;
      });
    });
    return [steps, ...columns];
  }

  protected series(): uPlot.Series[] {
    return [
      { label: "step" },
      ...this.runs.map((r, i) => ({
        label: r.label,
        stroke: RUN_COLORS[i % RUN_COLORS.length],
        width: 1.5,
        spanGaps: true,
        points: { show: false },
        value: (_u: uPlot, v: number | null) => formatTick(v),
      })),
    ];
  }

  protected showsLegend(): boolean {
    return true;
  }

  protected logScaleNote(): string {
    return this.runs.some((r) => r.points.some((p) => p[1] <= 0))
      ? "Values at or below zero are left out on a log scale."
      : "";
  }
}

// The value axis as wide as its longest label (about 7 px a character at uPlot's 12 px font), so labels such as
// 6.91725 are not cut off at the chart's left edge.
const VALUE_AXIS: uPlot.Axis = {
  stroke: "#667",
  values: (_u, ticks) => formatTicks(ticks),
  size: (_u, labels) => Math.max(40, 18 + 7 * Math.max(0, ...(labels ?? []).map((l) => String(l).length))),
  grid: { stroke: "#eceef2" },
};

/** An axis's labels with as many digits as its tick spacing needs: a loss moving in its fourth decimal gets
 * 6.9515, 6.9520, ... rather than five labels all reading 6.952. */
function formatTicks(ticks: (number | null)[]): string[] {
  // A log scale's splits hold nulls for the ticks it leaves unlabelled.
  const shown = ticks.filter((t): t is number => t !== null && Number.isFinite(t));
  const gaps = shown.slice(1).map((t, i) => Math.abs(t - shown[i])).filter((g) => g > 0);
  const gap = gaps.length ? Math.min(...gaps) : 0;
  const biggest = Math.max(0, ...shown.map(Math.abs));
  if (!gap || biggest >= 1e5 || (biggest < 1e-3 && biggest > 0)) return ticks.map(formatTick);
  const decimals = Math.min(10, Math.max(0, Math.ceil(-Math.log10(gap) - 1e-9)));
  return ticks.map((t) => (t === null ? "" : decimals > 6 ? t.toExponential(2) : t.toFixed(decimals)));
}

function formatTick(v: number | null): string {
  if (v === null) return "";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
  return String(Number(v.toPrecision(4)));
}
