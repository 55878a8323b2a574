using Distributed.Cluster.ControlPlane;
using Spectre.Console;

namespace Distributed.Cli.Run;

/// <summary>
/// Rank 0's progress bar (Spectre.Console) with the current phase, percentage and time remaining. Phases
/// report progress from the rank's thread; a background task renders it. A no-op when disabled
/// (<c>--no-progress</c>, or standard output not a terminal, as in CI logs and under mpiexec).
/// </summary>
internal sealed class RunProgress : IDisposable
{
    private readonly object _gate = new();
    private readonly Task? _render;
    private readonly CancellationTokenSource _stop = new();
    private string _phase = "";
    private double _total = 1, _done;
    private bool _phaseChanged;
    private double _reportTotal = 1, _reportDone;

    private RunProgress(bool enabled)
    {
        if (!enabled) return;
        _render = Task.Run(RenderAsync);
    }

    /// <summary>A progress bar for rank 0 when <paramref name="wanted"/> and the console is interactive; otherwise a no-op.</summary>
    public static RunProgress Create(bool wanted, bool isRankZero) =>
        new(wanted && isRankZero && !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Interactive);

    /// <summary>A progress object that shows nothing.</summary>
    public static RunProgress None => new(false);

    /// <summary>True when a bar is shown.</summary>
    public bool Enabled => _render is not null;

    /// <summary>Starts a phase of <paramref name="total"/> units.</summary>
    public void Phase(string name, double total)
    {
        // Every rank's phase and progress also go into its control-plane heartbeats.
        _reportTotal = Math.Max(total, 1e-9);
        _reportDone = 0;
        RankActivity.Set(name.Length == 0 ? "finishing" : name, 0);
        if (!Enabled) return;
        lock (_gate) { _phase = name; _total = Math.Max(total, 1e-9); _done = 0; _phaseChanged = true; }
    }

    /// <summary>Adds <paramref name="units"/> to the current phase.</summary>
    public void Advance(double units)
    {
        _reportDone += units;
        RankActivity.SetProgress(Math.Min(1, _reportDone / _reportTotal));
        if (!Enabled) return;
        lock (_gate) _done = Math.Min(_total, _done + units);
    }

    /// <summary>A line of text: above the bar while it is shown (Spectre keeps them apart), else plain.</summary>
    public void WriteLine(string line)
    {
        if (Enabled) AnsiConsole.WriteLine(line);
        else Console.WriteLine(line);
    }

    private async Task RenderAsync()
    {
        await AnsiConsole.Progress()
            .AutoClear(true)
            .HideCompleted(true)
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn(), new SpinnerColumn())
            .StartAsync(async ctx =>
            {
                ProgressTask? task = null;
                while (!_stop.IsCancellationRequested)
                {
                    lock (_gate)
                    {
                        if (_phaseChanged)
                        {
                            task?.StopTask();
                            task = ctx.AddTask(Markup.Escape(_phase), maxValue: 1000);
                            _phaseChanged = false;
                        }
                        task?.Value = 1000 * _done / _total;
                    }
                    try { await Task.Delay(150, _stop.Token).ConfigureAwait(false); }
                    catch (OperationCanceledException) { break; }
                }
                task?.StopTask();
            }).ConfigureAwait(false);
    }

    public void Dispose()
    {
        if (_render is null) return;
        _stop.Cancel();
        try { _render.Wait(TimeSpan.FromSeconds(2)); }
        catch (AggregateException) { }
        _stop.Dispose();
    }
}
