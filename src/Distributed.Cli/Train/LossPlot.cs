using ScottPlot;

namespace Distributed.Cli.Train;

/// <summary>The loss curves of one or more runs as a PNG, one panel per run side by side (ScottPlot).</summary>
internal static class LossPlot
{
    /// <summary>Writes the PNG atomically (a temporary beside the target, then a rename).</summary>
    public static void Save(string path, IReadOnlyList<(string Title, IReadOnlyList<StepResult> Steps)> runs)
    {
        var multiplot = new Multiplot();
        multiplot.AddPlots(runs.Count);
        multiplot.Layout = new ScottPlot.MultiplotLayouts.Columns();
        double top = runs.Max(r => r.Steps.Max(s => s.Loss)) * 1.05;
        for (int i = 0; i < runs.Count; i++)
        {
            var plot = multiplot.GetPlot(i);
            var (title, steps) = runs[i];
            var line = plot.Add.Scatter(steps.Select(s => (double)s.Step).ToArray(), steps.Select(s => s.Loss).ToArray());
            line.MarkerSize = 0;
            line.LineWidth = 2;
            plot.Title(title);
            plot.XLabel("step");
            plot.YLabel("loss (mean cross-entropy)");
            plot.Axes.SetLimitsY(0, top);
        }
        string full = Path.GetFullPath(path);
        string tmp = Path.Combine(Path.GetDirectoryName(full)!, $".{Path.GetFileName(full)}.tmp-{Environment.ProcessId}.png");
        try
        {
            multiplot.SavePng(tmp, 420 * runs.Count, 360);
            File.Move(tmp, full, overwrite: true);
        }
        finally { File.Delete(tmp); }
    }
}
