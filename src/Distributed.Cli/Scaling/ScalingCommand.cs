using System.CommandLine;
using System.Globalization;
using Distributed.Cluster;
using Spectre.Console;

namespace Distributed.Cli.Scaling;

/// <summary>
/// <c>dsattn bench scaling</c>: schemes × P × N for both attention kinds, in-process or under mpiexec
/// (the world size is then the largest P), written as JSON, CSV and PNG plots into <c>--out</c>.
/// </summary>
internal static class ScalingCommand
{
    public static Command Create()
    {
        var output = new Option<string>("--out") { Description = "Folder for scaling.json, scaling.csv and the PNG plots (created if missing).", DefaultValueFactory = _ => "scaling-results" };
        var quick = new Option<bool>("--quick") { Description = "A small sweep that finishes in about a minute on two cores: H=4, D=32, lightning N = 1K..4K, softmax N = 256..1K." };
        var ranks = new Option<string>("--ranks") { Description = "P values, comma-separated (in-process; under mpiexec those up to the world size).", DefaultValueFactory = _ => "1,2,4" };
        var kinds = new Option<string>("--attention") { Description = "lightning, softmax or both.", DefaultValueFactory = _ => "both" };
        kinds.AcceptOnlyFromAmong("lightning", "softmax", "both");
        var schemes = new Option<string?>("--schemes") { Description = "Schemes to run (comma-separated). Default: lasp2, lasp1, ulysses, hybrid for lightning; allgather, ring, partial, ulysses, hybrid for softmax." };
        var lightningSeqs = new Option<string?>("--seqs") { Description = "Lightning N values, comma-separated (default 4096,8192,16384,32768; --quick 1024,2048,4096)." };
        var softmaxSeqs = new Option<string?>("--softmax-seqs") { Description = "Softmax N values (default 1024,2048,4096; --quick 256,512,1024)." };
        var heads = new Option<int?>("--heads") { Description = "H = Hk (default 8; --quick 4)." };
        var headDim = new Option<int?>("--head-dim") { Description = "D = Dv (default 64; --quick 32)." };
        var iterations = new Option<int>("--iterations") { Description = "Measured steps per case after one warm-up (the step whose slowest rank was fastest is kept).", DefaultValueFactory = _ => 2 };
        var backend = new Option<string>("--backend") { Description = "Kernel backend (as for run).", DefaultValueFactory = _ => "auto" };
        var noProgress = new Option<bool>("--no-progress") { Description = "No progress bar." };
        var kernels = new Option<string?>("--kernels") { Description = "Kernel rates for the model column from a `dsattn bench kernels --json` file. Default: calibrated from this sweep's P = 1 cases (FLOPs over kernel time, per kind and direction)." };
        var command = new Command("scaling", "Sweep schemes × P × N (strong scaling at each N, weak scaling along N = P·N0) for both attention kinds, forward and backward, causal; per rank and phase: compute, communication and waiting time, bytes, peak memory. Writes scaling.json, scaling.csv and PNG plots into --out.")
        {
            output, quick, ranks, kinds, schemes, lightningSeqs, softmaxSeqs, heads, headDim, iterations, backend, noProgress, kernels,
        };
        command.SetAction(parse =>
        {
            var launch = LaunchEnvironment.Detect();
            bool rankZero = launch.Kind != LaunchKind.Mpich || launch.Rank <= 0;
            ScalingPlan plan;
            string dir;
            try
            {
                bool q = parse.GetValue(quick);
                string which = parse.GetValue(kinds)!;
                var wanted = ParseSchemes(parse.GetValue(schemes), which);
                int h = parse.GetValue(heads) ?? (q ? 4 : 8), d = parse.GetValue(headDim) ?? (q ? 32 : 64);
                if (h < 1 || d < 1) throw new ArgumentException("--heads and --head-dim must be at least 1.");
                int it = parse.GetValue(iterations);
                if (it < 1) throw new ArgumentException($"--iterations must be at least 1 (got {it}).");
                plan = new ScalingPlan
                {
                    Schemes = wanted,
                    Ranks = ParseInts(parse.GetValue(ranks)!, "--ranks"),
                    LightningSeqs = ParseInts(parse.GetValue(lightningSeqs) ?? (q ? "1024,2048,4096" : "4096,8192,16384,32768"), "--seqs"),
                    SoftmaxSeqs = ParseInts(parse.GetValue(softmaxSeqs) ?? (q ? "256,512,1024" : "1024,2048,4096"), "--softmax-seqs"),
                    Heads = h, KvHeads = h, HeadDim = d, ValueDim = d, Iterations = it, Backend = parse.GetValue(backend)!,
                };
                dir = Path.GetFullPath(parse.GetValue(output)!);
                if (rankZero) Directory.CreateDirectory(dir);
            }
            catch (Exception e) when (e is ArgumentException or IOException or UnauthorizedAccessException)
            {
                if (rankZero) Console.Error.WriteLine($"dsattn bench scaling: {e.Message}");
                return 2;
            }
            int world = launch.Kind == LaunchKind.Mpich ? launch.Size : plan.Ranks.Max();
            int ranksHere = launch.Kind == LaunchKind.Mpich ? Math.Max(1, launch.LocalSize) : world;
            int threads = RankAffinity.ThreadsPerRank(ranksHere);
            bool bar = rankZero && !parse.GetValue(noProgress) && !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Interactive;
            List<CaseResult> results = [];
            List<string> skipped = [];
            (double AlphaSeconds, double BytesPerSecond) link = default;
            void Sweep(Action<string, int, int>? report) => RankRunner.Run(launch, world, comm =>
            {
                var (r, s, l) = ScalingSweep.Run(comm, plan, threads, comm.Rank == 0 ? report : null);
                if (comm.Rank == 0) (results, skipped, link) = (r, s, l);
                return 0;
            });
            if (bar)
                AnsiConsole.Progress().AutoClear(true).Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
                    .Start(ctx =>
                    {
                        var task = ctx.AddTask("scaling", maxValue: 1);
                        Sweep((what, done, total) => { task.MaxValue = Math.Max(1, total); task.Value = done; task.Description = Markup.Escape(what); });
                    });
            else
                Sweep(null);
            if (!rankZero) return 0;
            if (results.Count == 0)
            {
                Console.Error.WriteLine("dsattn bench scaling: no case ran" + (skipped.Count > 0 ? $"; skipped: {string.Join("; ", skipped)}" : "."));
                return 1;
            }
            string environment = FormattableString.Invariant($"{(launch.Kind == LaunchKind.Mpich ? $"MPI, {launch.Size} ranks" : $"in-process, {world} ranks")}, {Environment.ProcessorCount} cores, {threads} kernel thread(s) per rank, backend {plan.Backend}");
            Dictionary<CaseResult, double> model;
            try { model = ScalingModel.Simulate(dir, results, link, world, parse.GetValue(kernels), environment, out string calibration); Console.WriteLine(calibration); }
            catch (ArgumentException e)
            {
                Console.Error.WriteLine($"dsattn bench scaling: {e.Message}");
                return 2;
            }
            ScalingReport.WriteJson(dir, results, environment, model);
            ScalingReport.WriteCsv(dir, results);
            var plots = ScalingPlots.Write(dir, results);
            Print(results, environment, model);
            foreach (var s in skipped) Console.WriteLine($"skipped {s}");
            Console.WriteLine($"wrote {Path.Combine(dir, ScalingReport.JsonName)}, {ScalingReport.CsvName}, {ScalingModel.HardwareName}, {string.Join(", ", plots)}");
            return 0;
        });
        return command;
    }

    private static void Print(List<CaseResult> results, string environment, Dictionary<CaseResult, double> model)
    {
        Console.WriteLine($"bench scaling ({environment}); per step, slowest rank; compute/comm/wait are the means over ranks of forward + backward:");
        Console.WriteLine($"{"attention",-9} {"scheme",-9} {"P",2} {"N",7} {"step ms",9} {"compute",9} {"comm",9} {"wait",9} {"sent/rank",10} {"model ms",9}");
        foreach (var c in results)
            Console.WriteLine(FormattableString.Invariant($"{c.AttentionName,-9} {c.SchemeName,-9} {c.Ranks,2} {c.Shape.SeqLen,7} {c.StepMs,9:F1} {c.PerRank.Average(r => r.Forward.ComputeMs + r.Backward.ComputeMs),9:F1} {c.PerRank.Average(r => r.Forward.CommMs + r.Backward.CommMs),9:F1} {c.PerRank.Average(r => r.Forward.WaitMs + r.Backward.WaitMs),9:F1} {Run.RunSummary.Bytes(c.PerRank.Max(r => r.Forward.BytesSent + r.Backward.BytesSent)),10} {(model.TryGetValue(c, out double m) ? m.ToString("F1", CultureInfo.InvariantCulture) : "-"),9}"));
    }

    private static List<int> ParseInts(string text, string option)
    {
        var list = new List<int>();
        foreach (var part in text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries))
        {
            if (!int.TryParse(part, NumberStyles.None, CultureInfo.InvariantCulture, out int v) || v < 1)
                throw new ArgumentException($"{option} takes positive integers separated by commas (got '{text}').");
            list.Add(v);
        }
        if (list.Count == 0) throw new ArgumentException($"{option} needs at least one value.");
        return list;
    }

    private static List<(AttentionKind, ParallelScheme)> ParseSchemes(string? text, string kinds)
    {
        var lightning = new[] { ParallelScheme.Lasp2, ParallelScheme.Lasp1, ParallelScheme.Ulysses, ParallelScheme.Hybrid };
        var softmax = new[] { ParallelScheme.AllGather, ParallelScheme.Ring, ParallelScheme.Partial, ParallelScheme.Ulysses, ParallelScheme.Hybrid };
        HashSet<ParallelScheme>? chosen = null;
        if (text is not null)
        {
            chosen = [];
            foreach (var name in text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries))
            {
                var match = Enum.GetValues<ParallelScheme>().Where(s => s.ToString().Equals(name, StringComparison.OrdinalIgnoreCase)).ToList();
                if (match.Count == 0) throw new ArgumentException($"--schemes: unknown scheme '{name}'; use lasp2, lasp1, allgather, ring, partial, ulysses or hybrid.");
                chosen.Add(match[0]);
            }
        }
        var list = new List<(AttentionKind, ParallelScheme)>();
        if (kinds is "lightning" or "both") list.AddRange(lightning.Where(s => chosen?.Contains(s) ?? true).Select(s => (AttentionKind.Lightning, s)));
        if (kinds is "softmax" or "both") list.AddRange(softmax.Where(s => chosen?.Contains(s) ?? true).Select(s => (AttentionKind.Softmax, s)));
        if (list.Count == 0) throw new ArgumentException($"--schemes '{text}' has no scheme for --attention {kinds}.");
        return list;
    }
}
