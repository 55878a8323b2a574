using System.CommandLine;
using Distributed.Cli.Run;
using Distributed.Kernels;

namespace Distributed.Cli.Commands;

/// <summary>
/// <c>dsattn run</c>: one attention layer split over ranks (MPI under mpiexec, in-process threads
/// otherwise), on synthetic inputs or on .npy files, forward and optionally backward, timed per phase,
/// optionally checked (an independent fp64 reference on sampled rows, or a single-device rerun).
/// </summary>
internal static class RunCommand
{
    public static Command Create()
    {
        var ranks = new Option<int>("--ranks") { Description = "In-process ranks (threads) when not launched by mpiexec.", DefaultValueFactory = _ => 4, CustomParser = r => Count(r) ?? 0 };
        var attention = new Option<string?>("--attention") { Description = "softmax or lightning. With neither --attention nor --scheme, runs the representative verified job (lightning LASP-2 with decay, then causal softmax all-gather; forward, backward, --check)." };
        OneOf(attention, "softmax", "lightning");
        var scheme = new Option<string?>("--scheme") { Description = $"{SchemeNames()}. Default: lasp2 for lightning, allgather for softmax." };
        OneOf(scheme, [.. SchemeRegistry.All.Select(x => x.Name)]);
        var batch = new Option<int?>("--batch") { Description = "Batch size B (default 1; taken from --q when given).", CustomParser = Count };
        var seq = new Option<int?>("--seq") { Description = $"Global sequence length N in tokens (default: {DefaultSeqLen}, or {RepresentativeSoftmaxSeqLen} and {RepresentativeLightningSeqLen} in the representative job; taken from --q when given).", CustomParser = Count };
        var heads = new Option<int?>("--heads") { Description = "Query heads H (default 8; taken from --q when given).", CustomParser = Count };
        var kvHeads = new Option<int?>("--kv-heads") { Description = "Key/value heads Hk (GQA; H % Hk == 0). Default: H, or taken from --k.", CustomParser = Count };
        var headDim = new Option<int?>("--head-dim") { Description = "Head dim D of Q and K (default 64; taken from --q when given).", CustomParser = Count };
        var valueDim = new Option<int?>("--value-dim") { Description = "Head dim Dv of V. Default: D, or taken from --v.", CustomParser = Count };
        var causal = new Option<bool>("--causal") { Description = "Causal masking (the default)." };
        var noCausal = new Option<bool>("--no-causal") { Description = "Bidirectional attention." };
        var decay = new Option<string>("--decay") { Description = "Lightning decay: none, auto (TransNormerLLM slopes λ_h = exp(-s_h)), one λ in (0,1], or λ1,...,λH.", DefaultValueFactory = _ => "auto" };
        var layout = new Option<string?>("--layout") { Description = "contiguous or zigzag token sharding. Default: the scheme's best (zigzag for causal)." };
        OneOf(layout, "contiguous", "zigzag");
        var ulyssesDegree = new Option<int>("--ulysses-degree") { Description = "Hybrid: ranks per head group Ph (P = Ph × Ps). Default: the largest divisor of P that divides H." };
        var hybridSchemes = SchemeRegistry.All.Where(x => x.HybridSequenceScheme).Select(x => x.Name).ToArray();
        var hybridScheme = new Option<string>("--hybrid-scheme") { Description = $"Hybrid softmax: the sequence scheme across head groups ({string.Join(", ", hybridSchemes)}).", DefaultValueFactory = _ => "allgather" };
        OneOf(hybridScheme, hybridSchemes);
        var backward = new Option<bool>("--backward") { Description = "Also run the backward pass (dQ, dK, dV)." };
        var backend = new Option<string>("--backend") { Description = $"Kernel backend: {string.Join(", ", KernelBackends.Names)}. auto = CUDA when present, else the vectorized CPU backend.", DefaultValueFactory = _ => "auto" };
        OneOf(backend, [.. KernelBackends.Names]);
        var device = new Option<int?>("--device") { Description = "GPU index for this rank. Default: local rank % device count." };
        var seed = new Option<ulong>("--seed") { Description = "Seed of the synthetic inputs (and of the rows --check samples).", DefaultValueFactory = _ => 1234 };
        var iterations = new Option<int>("--iterations") { Description = "Repeat the step K times (timings are per step).", DefaultValueFactory = _ => 1 };
        var warmup = new Option<int>("--warmup") { Description = "Untimed steps before the timed ones (JIT, pools, first-touch memory), so that the timings and the hidden share show the steady state.", DefaultValueFactory = _ => 0 };
        var check = new Option<string?>("--check") { Description = "Verify the run. --check (or --check sampled): an independent fp64 reference computed from the inputs on sampled rows of every rank (first and last row of each shard range plus random rows, all heads) for O, LSE, dQ, dK and dV; cheap at any N. --check full: rank 0 reruns the same kernels over the whole sequence on one device. Both print the max relative error per tensor; exit code 1 above --tolerance.", Arity = ArgumentArity.ZeroOrOne };
        check.AcceptOnlyFromAmong("sampled", "full");
        var checkFinite = new Option<bool>("--check-finite") { Description = "Scan the inputs (Q, K, V and dO) for NaN and Inf before the first step; a bad value ends the run with exit code 2, naming the tensor and the first bad element, and nothing is written." };
        var checkRows = new Option<int>("--check-rows") { Description = "Random rows per rank that --check samples, besides the first and last row of each shard range.", DefaultValueFactory = _ => 8 };
        var tolerance = new Option<double>("--tolerance") { Description = "Max relative error (max|a-b| / max|b|) that --check accepts.", DefaultValueFactory = _ => 1e-4 };
        var json = new Option<string?>("--json") { Description = "Write the results (per job: per-rank timings, bytes, peak memory, check errors) to this JSON file, atomically." };
        var noProgress = new Option<bool>("--no-progress") { Description = "No progress bar (it is also off when standard output is not a terminal)." };
        var qFile = new Option<string?>("--q") { Description = "Q from a .npy file, [B, N, H, D] float32 or float16, C order. Needs --k and --v; shapes then come from the files." };
        var kFile = new Option<string?>("--k") { Description = "K from a .npy file, [B, N, Hk, D]." };
        var vFile = new Option<string?>("--v") { Description = "V from a .npy file, [B, N, Hk, Dv]." };
        var doutFile = new Option<string?>("--dout") { Description = "dO from a .npy file, [B, N, H, Dv] (with --backward and --q)." };
        var outFile = new Option<string?>("--out") { Description = "Write O [B, N, H, Dv] to this .npy file (float32). Each rank writes its own rows; the file appears only when every rank succeeded." };
        var lseFile = new Option<string?>("--lse") { Description = "Softmax: write LSE [B, H, N] (natural log) to this .npy file." };
        var gradsPrefix = new Option<string?>("--grads") { Description = "With --backward: write PREFIX.dq.npy, PREFIX.dk.npy and PREFIX.dv.npy." };
        var controlPlane = new Option<string?>("--control-plane") { Description = "on or off: under mpiexec, rank 0 hosts a gRPC coordinator (loopback, token-protected) that collects heartbeats and ends a hung job with a report naming the culprit rank (default: on under MPI)." };
        controlPlane.AcceptOnlyFromAmong("on", "off");
        var hangTimeout = new Option<double?>("--hang-timeout") { Description = "Seconds ranks may wait inside a collective that another rank never entered before the job is ended (default 300). In-process: the job's time limit (none unless given)." };
        var coordinatorBind = new Option<string>("--coordinator-bind") { Description = "Address the coordinator listens on: 127.0.0.1 (this host) or e.g. 0.0.0.0 when ranks run on other hosts.", DefaultValueFactory = _ => "127.0.0.1" };
        var failRank = new Option<int>("--fail-rank") { Description = "Testing: make this rank throw.", DefaultValueFactory = _ => -1, Hidden = true };
        var failAt = new Option<string>("--fail-at") { Description = "Testing: where --fail-rank throws: start (before the first collective) or write (after its outputs were partly written).", DefaultValueFactory = _ => "start", Hidden = true };
        failAt.AcceptOnlyFromAmong("start", "write");

        var command = new Command("run", "Run one attention layer split over ranks: in-process ranks by default, MPI ranks under mpiexec. Inputs are synthetic, or .npy files (--q --k --v [--dout]); outputs can be written as .npy (--out, --lse, --grads).")
        {
            ranks, attention, scheme, batch, seq, heads, kvHeads, headDim, valueDim, causal, noCausal, decay, layout, ulyssesDegree,
            hybridScheme, backward, backend, device, seed, iterations, warmup, check, checkFinite, checkRows, tolerance, json, noProgress,
            qFile, kFile, vFile, doutFile, outFile, lseFile, gradsPrefix, controlPlane, hangTimeout, coordinatorBind, failRank, failAt,
        };
        var linkOptions = LinkOptions.AddTo(command);
        command.SetAction(parse =>
        {
            string? att = parse.GetValue(attention), sch = parse.GetValue(scheme);
            bool representative = att is null && sch is null;
            if (parse.GetValue(causal) && parse.GetValue(noCausal))
                return RunExecution.Refuse("--causal and --no-causal contradict each other; give one.");
            bool isCausal = !parse.GetValue(noCausal);
            if (NotApplicable(parse, att, sch, decay, ulyssesDegree, hybridScheme, checkRows, tolerance, check, representative) is { } notApplicable)
                return RunExecution.Refuse(notApplicable);
            string decaySpec = parse.GetValue(decay)!;
            List<JobSpec> jobs;
            if (representative)
                jobs = [new JobSpec(AttentionKind.Lightning, ParallelScheme.Lasp2, isCausal, decaySpec), new JobSpec(AttentionKind.Softmax, ParallelScheme.AllGather, isCausal, decaySpec)];
            else
            {
                var kind = att == "lightning" || (att is null && sch is not null && SchemeRegistry.Describe(ParseScheme(sch)).Kinds is [AttentionKind.Lightning]) ? AttentionKind.Lightning : AttentionKind.Softmax;
                var chosen = sch is null ? (kind == AttentionKind.Lightning ? ParallelScheme.Lasp2 : ParallelScheme.AllGather) : ParseScheme(sch);
                jobs = [new JobSpec(kind, chosen, isCausal, decaySpec)];
            }
            var checkResult = parse.GetResult(check);
            var checkMode = checkResult is null ? (representative ? CheckMode.Sampled : CheckMode.None)
                : parse.GetValue(check) == "full" ? CheckMode.Full : CheckMode.Sampled;
            var files = new RunFiles
            {
                Q = parse.GetValue(qFile), K = parse.GetValue(kFile), V = parse.GetValue(vFile), DOut = parse.GetValue(doutFile),
                Out = parse.GetValue(outFile), Lse = parse.GetValue(lseFile), GradsPrefix = parse.GetValue(gradsPrefix),
            };
            var given = new ShapeOptions(parse.GetValue(batch), parse.GetValue(seq), parse.GetValue(heads), parse.GetValue(kvHeads),
                parse.GetValue(headDim), parse.GetValue(valueDim));
            var settings = new RunSettings
            {
                Jobs = jobs,
                Ranks = parse.GetValue(ranks),
                Layout = parse.GetValue(layout) switch { "zigzag" => ShardLayout.Zigzag, "contiguous" => ShardLayout.Contiguous, _ => null },
                UlyssesDegree = parse.GetValue(ulyssesDegree),
                HybridSequenceScheme = ParseScheme(parse.GetValue(hybridScheme)!),
                Backward = representative || parse.GetValue(backward),
                Backend = parse.GetValue(backend)!,
                Device = parse.GetValue(device),
                Seed = parse.GetValue(seed),
                Iterations = parse.GetValue(iterations),
                Warmup = parse.GetValue(warmup),
                Check = checkMode,
                CheckFinite = parse.GetValue(checkFinite),
                CheckRows = parse.GetValue(checkRows),
                Tolerance = parse.GetValue(tolerance),
                JsonPath = parse.GetValue(json),
                Progress = !parse.GetValue(noProgress),
                FailRank = parse.GetValue(failRank),
                FailAt = parse.GetValue(failAt)!,
                Files = files,
                ControlPlane = parse.GetValue(controlPlane) switch { "on" => true, "off" => false, _ => null },
                HangTimeout = parse.GetValue(hangTimeout),
                CoordinatorBind = parse.GetValue(coordinatorBind)!,
            };
            var (linked, linkError) = linkOptions.Apply(parse, settings);
            if (linked is null) return RunExecution.Refuse(linkError!);
            return RunExecution.Execute(linked, given, representative);
        });
        return command;
    }

    /// <summary>N of a run on synthetic inputs when --seq is not given.</summary>
    internal const int DefaultSeqLen = 8192;

    /// <summary>The representative job's lengths: long enough to show the schemes, short enough for half a minute on 2 cores.</summary>
    internal const int RepresentativeLightningSeqLen = 65536, RepresentativeSoftmaxSeqLen = 8192;

    /// <summary>
    /// An option given for a job it does not apply to is refused rather than ignored: a --decay for softmax, or a
    /// hybrid option for another scheme, is most likely a mistake in the job description.
    /// </summary>
    private static string? NotApplicable(ParseResult parse, string? att, string? sch, Option<string> decay, Option<int> ulyssesDegree,
        Option<string> hybridScheme, Option<int> checkRows, Option<double> tolerance, Option<string?> check, bool representative)
    {
        static bool Given(ParseResult p, Option o) => p.GetResult(o) is { Implicit: false };
        bool lightning = att == "lightning" || (att is null && sch is not null && SchemeRegistry.All.Any(x => x.Name == sch && x.Kinds is [AttentionKind.Lightning]));
        if (Given(parse, decay) && !representative && !lightning)
            return $"--decay applies to lightning attention only; this job is softmax attention ({sch ?? "allgather"}). Drop --decay or add --attention lightning.";
        if (sch != "hybrid")
        {
            if (Given(parse, ulyssesDegree))
                return $"--ulysses-degree applies to --scheme hybrid only (this run uses {(representative ? "lasp2 and allgather" : sch ?? (lightning ? "lasp2" : "allgather"))}). Drop it or add --scheme hybrid.";
            if (Given(parse, hybridScheme))
                return $"--hybrid-scheme applies to --scheme hybrid only (this run uses {(representative ? "lasp2 and allgather" : sch ?? (lightning ? "lasp2" : "allgather"))}). Drop it or add --scheme hybrid.";
        }
        else if (lightning && Given(parse, hybridScheme))
            return "--hybrid-scheme applies to softmax attention; the lightning hybrid always runs LASP-2 across head groups. Drop --hybrid-scheme.";
        bool checking = representative || parse.GetResult(check) is not null;
        if (!checking && Given(parse, tolerance))
            return "--tolerance sets what --check accepts, but no check was asked for; add --check or drop --tolerance.";
        if (Given(parse, checkRows) && (!checking || parse.GetValue(check) == "full"))
            return "--check-rows sets how many rows --check (sampled) compares; add --check (sampled, not full) or drop --check-rows.";
        return null;
    }

    /// <summary>
    /// A count option: a whole number that fits in 32 bits, or an error naming the option and the limit (the
    /// default parser's "Cannot parse argument ... as System.Nullable`1[System.Int32]" names neither). Values below 1
    /// are refused with the option's own rule when the run is validated.
    /// </summary>
    private static int? Count(System.CommandLine.Parsing.ArgumentResult r)
    {
        if (r.Tokens.Count == 0) return null;
        string text = r.Tokens[^1].Value;
        string option = r.Parent is System.CommandLine.Parsing.OptionResult o ? o.Option.Name : "the option";
        if (long.TryParse(text, System.Globalization.NumberStyles.AllowLeadingSign, System.Globalization.CultureInfo.InvariantCulture, out long v))
        {
            if (v is >= int.MinValue and <= int.MaxValue) return (int)v;
            r.AddError($"{option} {text} is outside what a 32-bit size holds (at most {int.MaxValue:N0}); use a smaller value.");
            return null;
        }
        r.AddError($"{option} takes a whole number, not '{text}'; e.g. {option} 8.");
        return null;
    }

    /// <summary>Accepts only <paramref name="values"/>, with an error that names the option and lists them.</summary>
    private static void OneOf<T>(Option<T> option, params string[] values)
    {
        option.Validators.Add(r =>
        {
            foreach (var token in r.Tokens)
                if (!values.Contains(token.Value, StringComparer.Ordinal))
                    r.AddError($"{option.Name}: '{token.Value}' is not one of {string.Join(", ", values)}; e.g. {option.Name} {values[0]}.");
        });
        option.CompletionSources.Add(values);
    }

    private static ParallelScheme ParseScheme(string name) => SchemeRegistry.Parse(name);

    /// <summary>The schemes and the attention kinds each runs, for the help text.</summary>
    internal static string SchemeNames() => string.Join(", ", SchemeRegistry.All.Select(x =>
        $"{x.Name} ({(x.Kinds.Count > 1 ? "both" : x.Kinds[0].ToString().ToLowerInvariant())})"));
}
