using System.Globalization;
using ScottPlot;

namespace Distributed.Cli.Scaling;

/// <summary>
/// The sweep's PNG plots (ScottPlot), one set per attention kind: step time vs N per scheme at the largest P
/// (log-log, with ideal slopes), bytes per rank vs N, weak-scaling efficiency vs P, and the
/// compute / communication / wait split per scheme at the largest P and N.
/// </summary>
internal static class ScalingPlots
{
    private const int Width = 900, Height = 600;

    /// <summary>Writes every plot that has data into <paramref name="dir"/>; returns the file names.</summary>
    public static List<string> Write(string dir, IReadOnlyList<CaseResult> results)
    {
        var written = new List<string>();
        foreach (var kind in results.Select(r => r.Attention).Distinct())
        {
            var ofKind = results.Where(r => r.Attention == kind).ToList();
            string k = kind.ToString().ToLowerInvariant();
            int pMax = ofKind.Max(r => r.Ranks);
            Save(dir, $"time_vs_n_{k}.png", TimeVsN(ofKind, pMax, kind), written);
            if (pMax > 1) Save(dir, $"bytes_vs_n_{k}.png", BytesVsN(ofKind, pMax, kind), written);
            if (WeakEfficiency(ofKind, kind) is { } weak) Save(dir, $"weak_efficiency_{k}.png", weak, written);
            Save(dir, $"time_split_{k}.png", Split(ofKind, pMax, kind), written);
        }
        return written;
    }

    private static void Save(string dir, string name, Plot plot, List<string> written)
    {
        string path = Path.Combine(dir, name);
        string tmp = Path.Combine(dir, $".{name}.tmp-{Environment.ProcessId.ToString(CultureInfo.InvariantCulture)}.png");
        try
        {
            plot.SavePng(tmp, Width, Height);
            File.Move(tmp, path, overwrite: true);
            written.Add(name);
        }
        finally { File.Delete(tmp); }
    }

    private static IEnumerable<IGrouping<string, CaseResult>> BySchemes(IEnumerable<CaseResult> cases) => cases.GroupBy(c => c.SchemeName).OrderBy(g => g.Key, StringComparer.Ordinal);

    private static Plot TimeVsN(List<CaseResult> cases, int p, AttentionKind kind)
    {
        var plot = new Plot();
        var atP = cases.Where(c => c.Ranks == p).ToList();
        foreach (var g in BySchemes(atP))
        {
            var pts = g.OrderBy(c => c.Shape.SeqLen).ToList();
            var line = plot.Add.Scatter(pts.Select(c => Math.Log10(c.Shape.SeqLen)).ToArray(), pts.Select(c => Math.Log10(c.StepMs)).ToArray());
            line.LegendText = g.Key;
        }
        // Ideal slopes through the fastest scheme's first point: linear (and quadratic for softmax).
        if (atP.Count > 0)
        {
            double nMin = atP.Min(c => c.Shape.SeqLen), nMax = atP.Max(c => c.Shape.SeqLen);
            var anchor = atP.Where(c => c.Shape.SeqLen == nMin).MinBy(c => c.StepMs)!;
            foreach (int slope in kind == AttentionKind.Softmax ? new[] { 1, 2 } : new[] { 1 })
            {
                double[] xs = [Math.Log10(nMin), Math.Log10(nMax)];
                double[] ys = [Math.Log10(anchor.StepMs), Math.Log10(anchor.StepMs) + slope * (xs[1] - xs[0])];
                var ideal = plot.Add.Scatter(xs, ys);
                ideal.LinePattern = LinePattern.Dashed;
                ideal.MarkerSize = 0;
                ideal.Color = Colors.Gray;
                ideal.LegendText = slope == 1 ? "ideal ∝ N" : "ideal ∝ N²";
            }
        }
        LogAxes(plot, atP.Select(c => c.Shape.SeqLen));
        plot.Title($"{Name(kind)}: forward+backward step vs N at P = {p} (slowest rank)");
        plot.XLabel("N (tokens, log scale)");
        plot.YLabel("step time, ms (log scale)");
        plot.ShowLegend(Alignment.UpperLeft);
        return plot;
    }

    private static Plot BytesVsN(List<CaseResult> cases, int p, AttentionKind kind)
    {
        var plot = new Plot();
        foreach (var g in BySchemes(cases.Where(c => c.Ranks == p)))
        {
            var pts = g.OrderBy(c => c.Shape.SeqLen).ToList();
            var bytes = pts.Select(c => c.PerRank.Max(r => r.Forward.BytesSent + r.Backward.BytesSent)).ToArray();
            if (bytes.Any(b => b <= 0)) continue;
            var line = plot.Add.Scatter(pts.Select(c => Math.Log10(c.Shape.SeqLen)).ToArray(), bytes.Select(Math.Log10).ToArray());
            line.LegendText = g.Key;
        }
        LogAxes(plot, cases.Where(c => c.Ranks == p).Select(c => c.Shape.SeqLen));
        plot.Title($"{Name(kind)}: bytes sent per rank per step vs N at P = {p} (busiest rank)");
        plot.XLabel("N (tokens, log scale)");
        plot.YLabel("bytes sent per step (log scale)");
        plot.ShowLegend(Alignment.UpperLeft);
        return plot;
    }

    /// <summary>
    /// Weak scaling from N/P = n0 (the smallest N at P = 1): efficiency(P) = T(1, n0) · (W(P·n0)/P) / W(n0) / T(P, P·n0)
    /// with W the step's FLOPs, so 1 means the step grew exactly as each rank's share of the work did (flat for
    /// lightning, ∝ P for softmax). Null when no scheme has two weak points.
    /// </summary>
    internal static Plot? WeakEfficiency(List<CaseResult> cases, AttentionKind kind)
    {
        var one = cases.Where(c => c.Ranks == 1).ToList();
        if (one.Count == 0) return null;
        int n0 = one.Min(c => c.Shape.SeqLen);
        var plot = new Plot();
        bool any = false;
        foreach (var g in BySchemes(cases))
        {
            var baseCase = g.FirstOrDefault(c => c.Ranks == 1 && c.Shape.SeqLen == n0);
            if (baseCase is null) continue;
            var pts = g.Where(c => c.Shape.SeqLen == (long)n0 * c.Ranks).OrderBy(c => c.Ranks).ToList();
            if (pts.Count < 2) continue;
            var eff = pts.Select(c => baseCase.StepMs * (c.Flops / c.Ranks / baseCase.Flops) / c.StepMs).ToArray();
            var line = plot.Add.Scatter(pts.Select(c => (double)c.Ranks).ToArray(), eff);
            line.LegendText = g.Key;
            any = true;
        }
        if (!any) return null;
        var ideal = plot.Add.HorizontalLine(1);
        ideal.LinePattern = LinePattern.Dashed;
        ideal.Color = Colors.Gray;
        plot.Title($"{Name(kind)}: weak-scaling efficiency, N/P = {n0}");
        plot.XLabel("P (ranks)");
        plot.YLabel("efficiency (1 = ideal)");
        plot.ShowLegend(Alignment.LowerLeft);
        return plot;
    }

    private static Plot Split(List<CaseResult> cases, int p, AttentionKind kind)
    {
        var plot = new Plot();
        var atP = cases.Where(c => c.Ranks == p).ToList();
        int n = atP.Max(c => c.Shape.SeqLen);
        var rows = atP.Where(c => c.Shape.SeqLen == n).OrderBy(c => c.SchemeName, StringComparer.Ordinal).ToList();
        Color[] colors = [Colors.SteelBlue, Colors.Orange, Colors.Crimson, Colors.Gray];
        string[] labels = ["compute", "communication (not waiting)", "waiting for a peer", "other (staging, glue)"];
        var bars = new List<Bar>();
        for (int i = 0; i < rows.Count; i++)
        {
            // The mean over ranks of each part of forward + backward.
            var c = rows[i];
            double compute = c.PerRank.Average(r => r.Forward.ComputeMs + r.Backward.ComputeMs);
            double wait = c.PerRank.Average(r => r.Forward.WaitMs + r.Backward.WaitMs);
            double comm = Math.Max(0, c.PerRank.Average(r => r.Forward.CommMs + r.Backward.CommMs) - wait);
            double wall = c.PerRank.Average(r => r.Forward.WallMs + r.Backward.WallMs);
            double other = Math.Max(0, wall - compute - comm - wait);
            double b = 0;
            double[] parts = [compute, comm, wait, other];
            for (int j = 0; j < parts.Length; j++)
            {
                bars.Add(new Bar { Position = i, ValueBase = b, Value = b + parts[j], FillColor = colors[j] });
                b += parts[j];
            }
        }
        plot.Add.Bars(bars);
        for (int j = 0; j < labels.Length; j++) plot.Legend.ManualItems.Add(new LegendItem { LabelText = labels[j], FillColor = colors[j] });
        plot.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericManual(
            Enumerable.Range(0, rows.Count).Select(i => (double)i).ToArray(), rows.Select(r => r.SchemeName).ToArray());
        plot.Axes.Margins(bottom: 0);
        plot.Title($"{Name(kind)}: where the step goes, P = {p}, N = {n} (mean over ranks)");
        plot.YLabel("ms per step");
        plot.ShowLegend(Edge.Right); // outside the axes, clear of the tallest bar
        return plot;
    }

    /// <summary>Log10 data on both axes: N ticks at the measured lengths, decade ticks with minor ticks on the values.</summary>
    private static void LogAxes(Plot plot, IEnumerable<int> seqs)
    {
        var n = seqs.Distinct().Order().ToArray();
        plot.Axes.Bottom.TickGenerator = new ScottPlot.TickGenerators.NumericManual(n.Select(x => Math.Log10(x)).ToArray(), n.Select(x => x.ToString("#,0", CultureInfo.InvariantCulture)).ToArray());
        plot.Axes.Left.TickGenerator = new ScottPlot.TickGenerators.NumericAutomatic
        {
            MinorTickGenerator = new ScottPlot.TickGenerators.LogMinorTickGenerator(),
            IntegerTicksOnly = true,
            LabelFormatter = y => Math.Pow(10, y) is var v && v >= 1000 ? v.ToString("#,0", CultureInfo.InvariantCulture) : v.ToString("G3", CultureInfo.InvariantCulture),
        };
    }

    private static string Name(AttentionKind kind) => kind == AttentionKind.Lightning ? "lightning" : "softmax";
}
