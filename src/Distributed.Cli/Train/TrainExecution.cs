using System.Globalization;
using System.Text.Json;
using Distributed.Cluster;
using Distributed.Kernels.Cpu;

namespace Distributed.Cli.Train;

/// <summary>
/// Carries out <c>dsattn train</c>: in-process ranks by default, MPI ranks under mpiexec (as <c>dsattn run</c>
/// detects it). Rank 0 prints one line per step, <c>step &lt;n&gt; loss &lt;value&gt;</c> (9 significant digits)
/// followed by more columns, then the held-out accuracy; with <c>--compare-ranks</c> it trains once per rank
/// count and prints each count's loss on the same line.
/// </summary>
internal static class TrainExecution
{
    private static readonly CultureInfo Inv = CultureInfo.InvariantCulture;

    public static int Refuse(string problem)
    {
        var launch = LaunchEnvironment.Detect();
        if (launch.Kind != LaunchKind.Mpich || launch.Rank <= 0) Console.Error.WriteLine($"dsattn train: {problem}");
        return 2;
    }

    public static int Execute(TrainSettings s)
    {
        var launch = LaunchEnvironment.Detect();
        bool underMpi = launch.Kind == LaunchKind.Mpich;
        if (s.Problem(underMpi) is { } problem) return Refuse(problem);
        return s.CompareRanks is { } counts ? Compare(s, counts) : Single(s, launch);
    }

    /// <summary>Trains in-process on <paramref name="ranks"/> ranks and returns rank 0's result (tests call it).</summary>
    public static TrainResult RunInProcess(TrainSettings s, int ranks, Action<StepResult>? onStep = null)
    {
        int threads = Math.Max(1, Environment.ProcessorCount / ranks);
        var results = InProcessCommunicator.Run(ranks, comm =>
        {
            using var backend = new CpuBackend(threads);
            return TrainRank.Run(comm, backend, s, threads, comm.Rank == 0 ? onStep : null);
        });
        return results[0];
    }

    private static int Single(TrainSettings s, LaunchEnvironment launch)
    {
        bool underMpi = launch.Kind == LaunchKind.Mpich;
        int ranksHere = underMpi ? Math.Max(1, launch.LocalSize) : s.Ranks;
        int threads = RankAffinity.ThreadsPerRank(ranksHere);
        return RankRunner.Run(launch, s.Ranks, comm =>
        {
            using var backend = new CpuBackend(threads);
            if (comm.Rank == 0)
                Console.Error.WriteLine($"dsattn train: {Describe(s)} on {comm.Size} {(underMpi ? "MPI" : "in-process")} rank(s), {threads} thread(s) each");
            var result = TrainRank.Run(comm, backend, s, threads, comm.Rank == 0 ? PrintStep : null);
            if (comm.Rank != 0) return 0;
            PrintAccuracy(result, s);
            if (s.PlotPath is not null) LossPlot.Save(s.PlotPath, [($"P = {comm.Size}", result.Steps)]);
            if (s.JsonPath is not null) WriteJson(s.JsonPath, s, [(comm.Size, result)]);
            return 0;
        });
    }

    private static int Compare(TrainSettings s, int[] counts)
    {
        Console.Error.WriteLine($"dsattn train: {Describe(s)}, in-process, once per rank count {string.Join(", ", counts)}");
        var runs = new List<(int Ranks, TrainResult Result)>();
        foreach (int p in counts)
        {
            Console.Error.WriteLine($"training on {p} rank(s)...");
            runs.Add((p, RunInProcess(s, p, s.Progress ? r => { if (r.Step % 50 == 0) Console.Error.WriteLine($"  P={p} step {r.Step} loss {r.Loss:G6}"); } : null)));
        }
        var first = runs[0].Result.Steps;
        for (int i = 0; i < first.Count; i++)
        {
            double worst = runs.Max(r => Math.Abs(r.Result.Steps[i].Loss - first[i].Loss) / Math.Abs(first[i].Loss));
            string others = string.Concat(runs.Skip(1).Select(r => $" ranks{r.Ranks} {r.Result.Steps[i].Loss.ToString("G9", Inv)}"));
            Console.WriteLine($"step {first[i].Step} loss {first[i].Loss.ToString("G9", Inv)}{others} max_rel_diff {worst.ToString("G3", Inv)}");
        }
        foreach (var (p, r) in runs)
            Console.WriteLine($"ranks {p}: accuracy {r.Accuracy.ToString("F4", Inv)} on {r.HeldOutAnswers} held-out queries; training {r.TrainSeconds.ToString("F1", Inv)} s");
        if (s.PlotPath is not null) LossPlot.Save(s.PlotPath, [.. runs.Select(r => ($"P = {r.Ranks}", r.Result.Steps))]);
        if (s.JsonPath is not null) WriteJson(s.JsonPath, s, runs);
        return 0;
    }

    private static void PrintStep(StepResult r) =>
        Console.WriteLine($"step {r.Step} loss {r.Loss.ToString("G9", Inv)} lr {r.LearningRate.ToString("G4", Inv)} ms {r.Milliseconds.ToString("F1", Inv)}");

    private static void PrintAccuracy(TrainResult r, TrainSettings s) =>
        Console.WriteLine($"accuracy {r.Accuracy.ToString("F4", Inv)} on {r.HeldOutAnswers} held-out queries ({(s.EvalSequences + s.Batch - 1) / s.Batch * s.Batch} sequences); training {r.TrainSeconds.ToString("F1", Inv)} s");

    internal static string Describe(TrainSettings s) =>
        $"{s.Layers} layer(s) (lightning {s.LightningScheme.ToString().ToLowerInvariant()} / softmax {s.SoftmaxScheme.ToString().ToLowerInvariant()}, {s.Layout.ToString().ToLowerInvariant()}), " +
        $"d={s.Dim} H={s.Heads}, recall of {s.Pairs} pairs with {s.Queries} queries, N={s.SeqLen} B={s.Batch}, {s.Steps} steps, lr {s.LearningRate.ToString("G3", Inv)}, seed {s.Seed}";

    private static void WriteJson(string path, TrainSettings s, IReadOnlyList<(int Ranks, TrainResult Result)> runs)
    {
        var doc = new
        {
            settings = new
            {
                steps = s.Steps, seq = s.SeqLen, layers = s.Layers, dim = s.Dim, heads = s.Heads, batch = s.Batch, pairs = s.Pairs,
                queries = s.Queries, keys = s.Keys, values = s.Values, softmaxScheme = s.SoftmaxScheme.ToString(),
                lightningScheme = s.LightningScheme.ToString(), layout = s.Layout.ToString(), seed = s.Seed, lr = s.LearningRate,
            },
            runs = runs.Select(r => new
            {
                ranks = r.Ranks,
                accuracy = r.Result.Accuracy,
                heldOutAnswers = r.Result.HeldOutAnswers,
                trainSeconds = r.Result.TrainSeconds,
                loss = r.Result.Steps.Select(x => x.Loss).ToArray(),
            }),
        };
        string full = Path.GetFullPath(path);
        string tmp = Path.Combine(Path.GetDirectoryName(full)!, $".{Path.GetFileName(full)}.tmp-{Environment.ProcessId}");
        try
        {
            File.WriteAllText(tmp, JsonSerializer.Serialize(doc, new JsonSerializerOptions { WriteIndented = true, NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals }));
            File.Move(tmp, full, overwrite: true);
        }
        finally { File.Delete(tmp); }
    }
}
