using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using Distributed.Cli.Run;
using Distributed.Cluster;
using Distributed.Kernels;
using Spectre.Console;

namespace Distributed.Cli.Commands;

/// <summary>
/// <c>dsattn run</c>: one attention layer split over ranks (MPI under mpiexec, in-process threads
/// otherwise), forward and optionally backward, timed per phase, optionally checked against a
/// single-device run.
/// </summary>
internal static class RunCommand
{
    public static Command Create()
    {
        var ranks = new Option<int>("--ranks") { Description = "In-process ranks (threads) when not launched by mpiexec.", DefaultValueFactory = _ => 4 };
        var attention = new Option<string?>("--attention") { Description = "softmax or lightning. With neither --attention nor --scheme, runs the representative verified job (lightning LASP-2 with decay, then causal softmax all-gather; forward, backward, --check)." };
        attention.AcceptOnlyFromAmong("softmax", "lightning");
        var scheme = new Option<string?>("--scheme") { Description = "lasp2 (lightning), allgather, partial, ring (softmax), ulysses, hybrid (both). Default: lasp2 for lightning, allgather for softmax." };
        scheme.AcceptOnlyFromAmong("lasp2", "allgather", "partial", "ring", "ulysses", "hybrid");
        var batch = new Option<int>("--batch") { Description = "Batch size B.", DefaultValueFactory = _ => 1 };
        var seq = new Option<int>("--seq") { Description = "Global sequence length N (tokens).", DefaultValueFactory = _ => 32768 };
        var heads = new Option<int>("--heads") { Description = "Query heads H.", DefaultValueFactory = _ => 8 };
        var kvHeads = new Option<int?>("--kv-heads") { Description = "Key/value heads Hk (GQA; H % Hk == 0). Default: H." };
        var headDim = new Option<int>("--head-dim") { Description = "Head dim D of Q and K.", DefaultValueFactory = _ => 64 };
        var valueDim = new Option<int?>("--value-dim") { Description = "Head dim Dv of V. Default: D." };
        var causal = new Option<bool>("--causal") { Description = "Causal masking (the default)." };
        var noCausal = new Option<bool>("--no-causal") { Description = "Bidirectional attention." };
        var decay = new Option<string>("--decay") { Description = "Lightning decay: none, auto (TransNormerLLM slopes λ_h = exp(-s_h)), one λ in (0,1], or λ1,...,λH.", DefaultValueFactory = _ => "auto" };
        var layout = new Option<string?>("--layout") { Description = "contiguous or zigzag token sharding. Default: the scheme's best (zigzag for causal)." };
        layout.AcceptOnlyFromAmong("contiguous", "zigzag");
        var ulyssesDegree = new Option<int>("--ulysses-degree") { Description = "Hybrid: ranks per head group Ph (P = Ph × Ps). Default: the largest divisor of P that divides H." };
        var hybridScheme = new Option<string>("--hybrid-scheme") { Description = "Hybrid softmax: the sequence scheme across head groups (allgather, ring, partial).", DefaultValueFactory = _ => "allgather" };
        hybridScheme.AcceptOnlyFromAmong("allgather", "ring", "partial");
        var backward = new Option<bool>("--backward") { Description = "Also run the backward pass (dQ, dK, dV)." };
        var backend = new Option<string>("--backend") { Description = $"Kernel backend: {string.Join(", ", KernelBackends.Names)}. auto = CUDA when present, else the vectorized CPU backend.", DefaultValueFactory = _ => "auto" };
        backend.AcceptOnlyFromAmong([.. KernelBackends.Names]);
        var device = new Option<int?>("--device") { Description = "GPU index for this rank. Default: local rank % device count." };
        var seed = new Option<ulong>("--seed") { Description = "Seed of the synthetic inputs.", DefaultValueFactory = _ => 1234 };
        var iterations = new Option<int>("--iterations") { Description = "Repeat the step K times (timings are per step).", DefaultValueFactory = _ => 1 };
        var check = new Option<bool>("--check") { Description = "Rank 0 runs the same kernels over the whole sequence and prints the max relative error of O (and dQ, dK, dV); exit code 1 above --tolerance." };
        var tolerance = new Option<double>("--tolerance") { Description = "Max relative error (max|a-b| / max|b|) that --check accepts.", DefaultValueFactory = _ => 1e-4 };
        var json = new Option<string?>("--json") { Description = "Write the results (per job: per-rank timings, bytes, check errors) to this JSON file." };
        var failRank = new Option<int>("--fail-rank") { Description = "Testing: make this rank throw before its first collective.", DefaultValueFactory = _ => -1, Hidden = true };

        var command = new Command("run", "Run one attention layer split over ranks: in-process ranks by default, MPI ranks under mpiexec.")
        {
            ranks, attention, scheme, batch, seq, heads, kvHeads, headDim, valueDim, causal, noCausal, decay, layout, ulyssesDegree,
            hybridScheme, backward, backend, device, seed, iterations, check, tolerance, json, failRank,
        };
        command.SetAction(parse =>
        {
            string? att = parse.GetValue(attention), sch = parse.GetValue(scheme);
            bool representative = att is null && sch is null;
            if (parse.GetValue(causal) && parse.GetValue(noCausal))
            {
                Console.Error.WriteLine("dsattn run: --causal and --no-causal contradict each other; give one.");
                return 2;
            }
            bool isCausal = !parse.GetValue(noCausal);
            string decaySpec = parse.GetValue(decay)!;
            int h = parse.GetValue(heads);
            List<JobSpec> jobs;
            if (representative)
                jobs = [new JobSpec(AttentionKind.Lightning, ParallelScheme.Lasp2, isCausal, decaySpec), new JobSpec(AttentionKind.Softmax, ParallelScheme.AllGather, isCausal, decaySpec)];
            else
            {
                var kind = att == "lightning" || (att is null && sch == "lasp2") ? AttentionKind.Lightning : AttentionKind.Softmax;
                var chosen = sch is null ? (kind == AttentionKind.Lightning ? ParallelScheme.Lasp2 : ParallelScheme.AllGather) : ParseScheme(sch);
                jobs = [new JobSpec(kind, chosen, isCausal, decaySpec)];
            }
            var settings = new RunSettings
            {
                Jobs = jobs,
                Ranks = parse.GetValue(ranks),
                Batch = parse.GetValue(batch),
                SeqLen = parse.GetValue(seq),
                Heads = h,
                KvHeads = parse.GetValue(kvHeads) ?? h,
                HeadDim = parse.GetValue(headDim),
                ValueDim = parse.GetValue(valueDim) ?? parse.GetValue(headDim),
                Layout = parse.GetValue(layout) switch { "zigzag" => ShardLayout.Zigzag, "contiguous" => ShardLayout.Contiguous, _ => null },
                UlyssesDegree = parse.GetValue(ulyssesDegree),
                HybridSequenceScheme = ParseScheme(parse.GetValue(hybridScheme)!),
                Backward = representative || parse.GetValue(backward),
                Backend = parse.GetValue(backend)!,
                Device = parse.GetValue(device),
                Seed = parse.GetValue(seed),
                Iterations = parse.GetValue(iterations),
                Check = representative || parse.GetValue(check),
                Tolerance = parse.GetValue(tolerance),
                JsonPath = parse.GetValue(json),
                FailRank = parse.GetValue(failRank),
            };
            return Execute(settings, representative);
        });
        return command;
    }

    private static ParallelScheme ParseScheme(string name) => name switch
    {
        "lasp2" => ParallelScheme.Lasp2,
        "allgather" => ParallelScheme.AllGather,
        "partial" => ParallelScheme.Partial,
        "ring" => ParallelScheme.Ring,
        "ulysses" => ParallelScheme.Ulysses,
        "hybrid" => ParallelScheme.Hybrid,
        _ => throw new ArgumentException($"Unknown scheme '{name}'.", nameof(name)),
    };

    private static string? Validate(RunSettings s)
    {
        if (s.Ranks < 1) return $"--ranks must be at least 1 (got {s.Ranks}).";
        if (s.Batch < 1) return $"--batch must be at least 1 (got {s.Batch}).";
        if (s.SeqLen < 1) return $"--seq must be at least 1 (got {s.SeqLen}).";
        if (s.Heads < 1) return $"--heads must be at least 1 (got {s.Heads}).";
        if (s.KvHeads < 1 || s.Heads % s.KvHeads != 0) return $"--kv-heads must divide --heads (got H={s.Heads}, Hk={s.KvHeads}); e.g. --kv-heads {s.Heads}.";
        if (s.HeadDim < 1 || s.ValueDim < 1) return "--head-dim and --value-dim must be at least 1.";
        if (s.Iterations < 1) return $"--iterations must be at least 1 (got {s.Iterations}).";
        if (!(s.Tolerance > 0)) return "--tolerance must be positive.";
        try
        {
            foreach (var j in s.Jobs)
                if (j.Attention == AttentionKind.Lightning) _ = RunSettings.ParseDecay(j.DecaySpec, s.Heads);
        }
        catch (ArgumentException e) { return e.Message; }
        if (s.JsonPath is not null)
        {
            string? dir = Path.GetDirectoryName(Path.GetFullPath(s.JsonPath));
            if (dir is not null && !Directory.Exists(dir)) return $"--json: the folder '{dir}' does not exist; create it or write elsewhere.";
        }
        return null;
    }

    private static int Execute(RunSettings s, bool representative)
    {
        if (Validate(s) is { } problem)
        {
            Console.Error.WriteLine($"dsattn run: {problem}");
            return 2;
        }
        var launch = LaunchEnvironment.Detect();
        if (launch.Kind == LaunchKind.None && representative)
            AnsiConsole.MarkupLine($"[bold]dsattn run[/]: the representative verified job on {s.Ranks} in-process ranks (no MPI needed). Options: dsattn run --help");
        // Ranks on this host share its cores: each rank's CPU backend gets its share.
        int ranksHere = launch.Kind == LaunchKind.Mpich ? Math.Max(1, launch.LocalSize) : s.Ranks;
        int threads = Math.Max(1, Environment.ProcessorCount / ranksHere);
        return RankRunner.Run(launch, s.Ranks, comm =>
            RunRank(comm, s, launch.LocalRank >= 0 ? launch.LocalRank : comm.Rank, threads, representative));
    }

    private static int RunRank(ICommunicator comm, RunSettings s, int localRank, int cpuThreads, bool representative)
    {
        int device = s.Device ?? localRank;
        using var backend = KernelBackends.Create(s.Backend, device, cpuThreads);
        void Log(string line) { if (comm.Rank == 0) AnsiConsole.MarkupLineInterpolated($"[grey]{line}[/]"); }
        string where = comm is InProcessCommunicator ? "in-process" : "MPI";
        // Every rank says where it runs; one line per rank, in rank order.
        for (int r = 0; r < comm.Size; r++)
        {
            if (r == comm.Rank) Console.WriteLine($"rank {comm.Rank}/{comm.Size} ({where}, host {Environment.MachineName}): backend {backend.Name}{(backend.Name.Contains("cuda", StringComparison.Ordinal) ? $" device {device}" : $", {cpuThreads} thread(s)")}");
            comm.Barrier();
        }
        var results = new List<JobResult>();
        foreach (var job in s.Jobs)
        {
            Log($"{Describe(job, s)}: forward{(s.Backward ? " + backward" : "")}, {s.Iterations} iteration(s)...");
            var result = RankJob.Execute(comm, backend, () => KernelBackends.Create(s.Backend, device, 0), job, s, Log);
            results.Add(result);
            if (comm.Rank == 0) Print(result, s);
        }
        bool passed = results.All(r => r.Passed);
        if (comm.Rank == 0)
        {
            if (s.JsonPath is not null) WriteJson(s, results);
            if (representative)
                AnsiConsole.MarkupLine(passed
                    ? "[green]Shown:[/] LASP-2 (one all-gather of [[B,H,D,Dv]] states per pass, bytes independent of N) and all-gather-KV softmax split over the ranks give the single-device result within tolerance, forward and backward."
                    : "[red]The distributed result differs from the single-device result beyond tolerance.[/]");
        }
        return passed ? 0 : 1;
    }

    private static string Describe(JobSpec job, RunSettings s) =>
        $"{job.Attention.ToString().ToLowerInvariant()} / {job.Scheme.ToString().ToLowerInvariant()} ({(job.Causal ? "causal" : "non-causal")}{(job.Attention == AttentionKind.Lightning ? $", decay {job.DecaySpec}" : "")}) " +
        $"B={s.Batch} N={s.SeqLen} H={s.Heads} Hk={s.KvHeads} D={s.HeadDim} Dv={s.ValueDim}";

    private static void Print(JobResult r, RunSettings s)
    {
        var table = new Table().Title(Markup.Escape($"{Describe(r.Spec, s)}, {r.Layout} sharding")).AddColumns("rank", "tokens", "forward ms", "backward ms", "compute ms", "comm ms", "sent/step", "received/step");
        foreach (var m in r.Ranks)
            table.AddRow(m.Rank.ToString(CultureInfo.InvariantCulture), m.LocalTokens.ToString(CultureInfo.InvariantCulture), F(m.ForwardMs), s.Backward ? F(m.BackwardMs) : "-",
                F(m.ComputeMs), F(m.CommunicationMs), Bytes(m.BytesSentPerStep), Bytes(m.BytesReceivedPerStep));
        AnsiConsole.Write(table);
        if (r.CheckSkippedReason is not null) AnsiConsole.MarkupLineInterpolated($"[yellow]check skipped: {r.CheckSkippedReason}[/]");
        foreach (var c in r.Checks)
            Console.WriteLine(FormattableString.Invariant($"check {c.Tensor}: max |error| {c.MaxAbsError:E2} over max |ref| {c.MaxAbsReference:E2} = relative {c.RelativeError:E2} (tolerance {s.Tolerance:E0}) {(c.Passed ? "ok" : "FAILED")}"));
    }

    private static string F(double ms) => ms.ToString("F1", CultureInfo.InvariantCulture);

    private static string Bytes(double b) => b >= 1 << 20 ? $"{b / (1 << 20):F2} MiB" : b >= 1 << 10 ? $"{b / 1024:F1} KiB" : $"{b:F0} B";

    private static void WriteJson(RunSettings s, List<JobResult> results)
    {
        var doc = results.Select(r => new
        {
            attention = r.Spec.Attention.ToString().ToLowerInvariant(),
            scheme = r.Spec.Scheme.ToString().ToLowerInvariant(),
            causal = r.Spec.Causal,
            decay = r.Spec.DecaySpec,
            layout = r.Layout,
            b = s.Batch, n = s.SeqLen, h = s.Heads, hk = s.KvHeads, d = s.HeadDim, dv = s.ValueDim,
            ranks = r.Ranks.Select(m => new { rank = m.Rank, tokens = m.LocalTokens, forwardMs = m.ForwardMs, backwardMs = m.BackwardMs, computeMs = m.ComputeMs, commMs = m.CommunicationMs, bytesSent = m.BytesSentPerStep, bytesReceived = m.BytesReceivedPerStep }),
            checks = r.Checks.Select(c => new { tensor = c.Tensor, maxAbsError = c.MaxAbsError, relativeError = c.RelativeError, passed = c.Passed }),
            checkSkipped = r.CheckSkippedReason,
        });
        string path = Path.GetFullPath(s.JsonPath!);
        string tmp = path + ".tmp-" + Environment.ProcessId.ToString(CultureInfo.InvariantCulture);
        File.WriteAllText(tmp, JsonSerializer.Serialize(doc, new JsonSerializerOptions { WriteIndented = true }));
        File.Move(tmp, path, overwrite: true);
    }
}
