using System.Diagnostics;
using Distributed.Cluster;
using Distributed.IO;
using Distributed.Kernels;
using Distributed.Kernels.Cpu;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Tests.Reliability;

/// <summary>
/// Bad input as one table of cases, library and CLI: every refusal names the parameter (or option) and says how to
/// fix it. The CLI exits non-zero with no stack trace and writes nothing; what can be checked before ranks start is
/// refused there, once (never as one "rank R failed" line per rank).
/// </summary>
public sealed class BadInputTests(ITestOutputHelper output) : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("dsattn-bad-").FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    private static readonly AttentionShape Ok = new(1, 64, 4, 2, 16, 16);

    private static SequenceParallelOptions Softmax(ParallelScheme scheme = ParallelScheme.AllGather) => new() { Attention = AttentionKind.Softmax, Scheme = scheme };

    private static SequenceParallelOptions Lightning(ParallelScheme scheme = ParallelScheme.Lasp2, float[]? decay = null) =>
        new() { Attention = AttentionKind.Lightning, Scheme = scheme, Decay = decay };

    /// <summary>A library case: shape and options checked for P ranks before any rank starts.</summary>
    public sealed record LibraryCase(string Name, AttentionShape Shape, SequenceParallelOptions Options, int Ranks, string Parameter, string[] Says)
    {
        public override string ToString() => Name;
    }

    public static TheoryData<LibraryCase> LibraryCases() =>
    [
        new("zero sequence", Ok with { SeqLen = 0 }, Softmax(), 1, "shape", ["at least 1"]),
        new("negative heads", Ok with { Heads = -4 }, Softmax(), 1, "shape", ["at least 1"]),
        new("zero value dim", Ok with { ValueDim = 0 }, Softmax(), 1, "shape", ["at least 1"]),
        new("heads not a multiple of KV heads", Ok with { Heads = 6, KvHeads = 4 }, Softmax(), 1, "shape", ["H % Hk == 0", "KvHeads = 6"]),
        new("Ulysses heads not divisible by P", Ok with { Heads = 6, KvHeads = 6 }, Softmax(ParallelScheme.Ulysses), 4, "shape", ["H % P == 0", "Hybrid"]),
        new("sequence shorter than the zigzag chunks", Ok with { SeqLen = 7 }, Softmax(), 4, "shape", ["8 chunks", "at least 8 tokens"]),
        new("sequence shorter than the contiguous chunks", Ok with { SeqLen = 3 }, Softmax(ParallelScheme.Partial), 4, "shape", ["4 chunks", "fewer ranks"]),
        new("LASP-2 sequence shorter than its chunks", Ok with { SeqLen = 5 }, Lightning(), 4, "shape", ["8 chunks"]),
        new("hybrid head group with fewer tokens than ranks", Ok with { SeqLen = 4, Heads = 4, KvHeads = 4 }, Softmax(ParallelScheme.Hybrid) with { UlyssesDegree = 4, Layout = ShardLayout.Contiguous }, 8, "shape", ["fewer than its 4 ranks", "smaller UlyssesDegree"]),
        new("hybrid degree not dividing P", Ok, Softmax(ParallelScheme.Hybrid) with { UlyssesDegree = 3 }, 4, "options", ["Ph = 3", "valid choices: 1, 2"]),
        new("overflowing sequence (2^31 - 1 tokens, 64 heads)", Ok with { SeqLen = int.MaxValue, Heads = 64, KvHeads = 64, HeadDim = 64, ValueDim = 64 }, Softmax(), 4, "shape", ["per rank", "shorter sequence"]),
        new("overflowing head dims", Ok with { Heads = 99999, KvHeads = 99999, HeadDim = 99999999, ValueDim = 99999999 }, Softmax(), 4, "shape", ["per rank", "more ranks"]),
        new("decay above 1", Ok, Lightning(decay: [1.5f, 1, 1, 1]), 1, "options", ["(0, 1]"]),
        new("decay 0", Ok, Lightning(decay: [0f, 1, 1, 1]), 1, "options", ["(0, 1]"]),
        new("decay negative", Ok, Lightning(decay: [-0.5f, 1, 1, 1]), 1, "options", ["(0, 1]"]),
        new("decay NaN", Ok, Lightning(decay: [float.NaN, 1, 1, 1]), 1, "options", ["(0, 1]"]),
        new("wrong number of decays", Ok, Lightning(decay: [0.9f, 0.9f]), 1, "options", ["2 values", "4 heads", "one λ per head"]),
        new("negative scale", Ok, Softmax() with { Scale = -0.25f }, 1, "options", ["Scale", "positive finite", "0 for 1/sqrt(D)"]),
        new("NaN scale", Ok, Softmax() with { Scale = float.NaN }, 1, "options", ["Scale", "0 for 1/sqrt(D)"]),
        new("infinite scale", Ok, Softmax() with { Scale = float.PositiveInfinity }, 1, "options", ["Scale", "positive finite"]),
        new("unknown scheme", Ok, Softmax((ParallelScheme)42), 1, "options", ["42", "AllGather"]),
        new("unknown attention kind", Ok, Softmax() with { Attention = (AttentionKind)7 }, 1, "options", ["Softmax or Lightning"]),
        new("unknown layout", Ok, Softmax() with { Layout = (ShardLayout)9 }, 1, "options", ["Contiguous, Zigzag"]),
        new("softmax scheme for lightning", Ok, Lightning(ParallelScheme.Ring), 1, "options", ["softmax attention", "Lasp2"]),
        new("LASP-2 for softmax", Ok, Softmax(ParallelScheme.Lasp2), 1, "options", ["lightning", "AllGather"]),
        new("decay given to softmax", Ok, Softmax() with { Decay = [0.9f, 0.9f, 0.9f, 0.9f] }, 1, "options", ["Decay applies to lightning", "Drop Decay"]),
        new("scale given to lightning", Ok, Lightning() with { Scale = 0.5f }, 1, "options", ["Scale applies to softmax", "Leave Scale at 0"]),
        new("Ulysses degree given to a non-hybrid scheme", Ok, Softmax() with { UlyssesDegree = 2 }, 2, "options", ["UlyssesDegree applies to the Hybrid", "leave it at 0"]),
        new("hybrid sequence scheme given to a non-hybrid scheme", Ok, Softmax() with { HybridSequenceScheme = ParallelScheme.Ring }, 2, "options", ["HybridSequenceScheme applies to the Hybrid"]),
        new("hybrid sequence scheme given to lightning hybrid", Ok, Lightning(ParallelScheme.Hybrid) with { HybridSequenceScheme = ParallelScheme.Ring }, 2, "options", ["always runs LASP-2"]),
        new("negative Ulysses degree", Ok, Softmax(ParallelScheme.Hybrid) with { UlyssesDegree = -1 }, 2, "options", ["negative"]),
    ];

    [Theory]
    [MemberData(nameof(LibraryCases))]
    public void Library_BadShapeOrOption_IsRefusedBeforeRanksStart_NamingParameterAndFix(LibraryCase c)
    {
        var e = Assert.ThrowsAny<ArgumentException>(() => SequenceParallelAttention.CheckFits(c.Shape, c.Options, c.Ranks, 1, checkHostMemory: false));
        output.WriteLine(e.Message);
        Assert.Equal(c.Parameter, e.ParamName);
        foreach (string s in c.Says) Assert.Contains(s, e.Message, StringComparison.Ordinal);
        // The constructor on live ranks refuses the same way (P = 1 cases run on one in-process rank).
        if (c.Ranks == 1)
        {
            var failed = Assert.Throws<RankFailedException>(() => InProcessCommunicator.Run(1, comm =>
            {
                using var backend = new CpuBackend(1);
                using var a = new SequenceParallelAttention(comm, backend, c.Shape, c.Options);
                return 0;
            }, TimeSpan.FromSeconds(30)));
            Assert.Equal(c.Parameter, Assert.IsAssignableFrom<ArgumentException>(failed.InnerException).ParamName);
        }
    }

    [Fact]
    public void Library_ZeroScale_MeansOneOverSqrtD()
    {
        // Same output with Scale = 0 and Scale = 1/sqrt(D); a different output with Scale = 1.
        float[] Run(float scale) => InProcessCommunicator.Run(2, comm =>
        {
            using var backend = new CpuBackend(1);
            using var a = new SequenceParallelAttention(comm, backend, Ok, Softmax() with { Scale = scale });
            var t = Tensors(backend, a.LocalTokens, 5);
            a.Forward(t.Q, t.K, t.V, t.O);
            var o = new float[t.O.Length];
            t.O.CopyToHost(o);
            t.Dispose();
            return o;
        })[0];
        var zero = Run(0);
        Assert.Equal(zero, Run(1 / MathF.Sqrt(Ok.HeadDim)));
        Assert.NotEqual(zero, Run(1));
    }

    public static TheoryData<string> TensorCases() => ["q 3-D", "k wrong heads", "v wrong Dv", "o wrong tokens", "dQ 3-D", "dV wrong batch"];

    [Theory]
    [MemberData(nameof(TensorCases))]
    public void Library_WrongLocalTensor_NamesTheTensorAndItsShape(string which)
    {
        var failed = Assert.Throws<RankFailedException>(() => InProcessCommunicator.Run(2, comm =>
        {
            using var backend = new CpuBackend(1);
            using var a = new SequenceParallelAttention(comm, backend, Ok, Softmax());
            int n = a.LocalTokens;
            using var t = Tensors(backend, n, 1);
            using var bad = which switch
            {
                "q 3-D" or "dQ 3-D" => backend.Allocate(1, n, Ok.Heads * Ok.HeadDim),
                "k wrong heads" => backend.Allocate(1, n, Ok.Heads, Ok.HeadDim),
                "v wrong Dv" => backend.Allocate(1, n, Ok.KvHeads, Ok.ValueDim + 1),
                "o wrong tokens" => backend.Allocate(1, n + 1, Ok.Heads, Ok.ValueDim),
                _ => backend.Allocate(2, n, Ok.KvHeads, Ok.ValueDim),
            };
            switch (which)
            {
                case "q 3-D": a.Forward(bad, t.K, t.V, t.O); break;
                case "k wrong heads": a.Forward(t.Q, bad, t.V, t.O); break;
                case "v wrong Dv": a.Forward(t.Q, t.K, bad, t.O); break;
                case "o wrong tokens": a.Forward(t.Q, t.K, t.V, bad); break;
                default:
                    a.Forward(t.Q, t.K, t.V, t.O);
                    if (which == "dQ 3-D") a.Backward(t.O, bad, t.K, t.V);
                    else a.Backward(t.O, t.Q, t.K, bad);
                    break;
            }
            return 0;
        }, TimeSpan.FromSeconds(30)));
        var e = Assert.IsAssignableFrom<ArgumentException>(failed.InnerException);
        output.WriteLine(e.Message);
        string name = which.Split(' ')[0];
        Assert.Equal(name, e.ParamName);
        Assert.Contains("must be", e.Message, StringComparison.Ordinal);
        Assert.Contains("Nloc=", e.Message, StringComparison.Ordinal);
    }

    public static TheoryData<string> DisagreeingRanks() => ["SeqLen", "Heads", "Scheme", "Causal", "Decay", "Scale"];

    /// <summary>Ranks given different shapes or options fail together with the field and the ranks named: never a hang.</summary>
    [Theory]
    [MemberData(nameof(DisagreeingRanks))]
    public void Library_RanksDisagree_EveryRankFailsNamingTheField(string field)
    {
        var sw = Stopwatch.StartNew();
        var failed = Assert.Throws<RankFailedException>(() => InProcessCommunicator.Run(4, comm =>
        {
            bool odd = comm.Rank == 2;
            bool lightning = field == "Decay";
            var shape = field switch
            {
                "SeqLen" => Ok with { SeqLen = odd ? 96 : 64 },
                "Heads" => Ok with { Heads = odd ? 8 : 4 },
                _ => Ok,
            };
            var options = lightning
                ? Lightning(decay: [0.9f, 0.9f, 0.9f, odd ? 0.8f : 0.9f])
                : Softmax(field == "Scheme" && odd ? ParallelScheme.Ring : ParallelScheme.AllGather) with
                {
                    Causal = !(field == "Causal" && odd),
                    Scale = field == "Scale" && odd ? 0.5f : 0,
                    Layout = ShardLayout.Contiguous,
                };
            using var backend = new CpuBackend(1);
            using var a = new SequenceParallelAttention(comm, backend, shape, options);
            return 0;
        }, TimeSpan.FromSeconds(30)));
        var e = Assert.IsAssignableFrom<ArgumentException>(failed.InnerException);
        output.WriteLine(e.Message);
        Assert.Contains($"{field} = ", e.Message, StringComparison.Ordinal);
        Assert.Contains("rank 2", e.Message, StringComparison.Ordinal);
        Assert.Contains("same global shape and options", e.Message, StringComparison.Ordinal);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(20), $"took {sw.Elapsed}");
    }

    /// <summary>A CLI case: the arguments after <c>dsattn run</c>, the exit code, and what stderr must say.</summary>
    public sealed record CliCase(string Name, string Args, int Exit, string[] Says)
    {
        public override string ToString() => Name;
    }

    public static TheoryData<CliCase> CliCases() =>
    [
        new("2^31-1 tokens, 64 heads (once a bare OverflowException)", "--seq 2147483647 --heads 64", 2, ["N=2147483647", "per rank", "shorter sequence"]),
        new("sequence past 32 bits", "--attention softmax --seq 4000000000", 1, ["--seq 4000000000", "at most 2,147,483,647"]),
        new("batch not a number", "--attention softmax --batch two", 1, ["--batch", "whole number"]),
        new("zero sequence", "--attention softmax --seq 0", 2, ["--seq must be at least 1"]),
        new("negative heads", "--attention softmax --heads -3", 2, ["--heads must be at least 1"]),
        new("negative head dim", "--attention softmax --head-dim -1", 2, ["--head-dim"]),
        new("heads not a multiple of KV heads", "--attention softmax --heads 6 --kv-heads 4", 2, ["--kv-heads must divide --heads", "--kv-heads 6"]),
        new("Ulysses heads not divisible by P", "--attention softmax --scheme ulysses --heads 6 --ranks 4", 2, ["H % P == 0", "H = 6 and P = 4"]),
        new("sequence shorter than the chunks", "--attention softmax --seq 7 --ranks 4", 2, ["8 chunks", "fewer ranks"]),
        new("zero ranks", "--attention softmax --ranks 0", 2, ["--ranks must be at least 1"]),
        new("decay above 1", "--attention lightning --decay 1.5", 2, ["--decay", "(0, 1]"]),
        new("decay NaN", "--attention lightning --decay nan", 2, ["--decay", "'nan'", "(0, 1]"]),
        new("wrong number of decays", "--attention lightning --heads 8 --decay 0.5,0.5", 2, ["--decay lists 2 values", "8 heads"]),
        new("unknown scheme", "--scheme bogus", 1, ["--scheme", "'bogus'", "allgather"]),
        new("unknown backend", "--attention softmax --backend quantum", 1, ["--backend", "'quantum'", "cpu"]),
        new("unknown layout", "--attention softmax --layout diagonal", 1, ["--layout", "'diagonal'", "zigzag"]),
        new("unknown attention", "--attention cosine", 1, ["--attention", "'cosine'", "softmax"]),
        new("decay given to softmax", "--attention softmax --decay 0.5", 2, ["--decay applies to lightning", "Drop --decay"]),
        new("Ulysses degree given to all-gather", "--attention softmax --ulysses-degree 2", 2, ["--ulysses-degree applies to --scheme hybrid"]),
        new("hybrid scheme given to ring", "--attention softmax --scheme ring --hybrid-scheme partial", 2, ["--hybrid-scheme applies to --scheme hybrid"]),
        new("hybrid scheme given to lightning hybrid", "--attention lightning --scheme hybrid --hybrid-scheme ring", 2, ["always runs LASP-2"]),
        new("tolerance without a check", "--attention softmax --tolerance 0.1", 2, ["--tolerance", "add --check"]),
        new("check rows with the full check", "--attention softmax --check full --check-rows 3", 2, ["--check-rows", "sampled"]),
        new("softmax scheme for lightning", "--attention lightning --scheme ring", 2, ["softmax attention", "Lasp2"]),
        new("LASP-2 for softmax", "--attention softmax --scheme lasp2", 2, ["lightning", "AllGather"]),
        new("hybrid degree not dividing P", "--attention softmax --scheme hybrid --ulysses-degree 3", 2, ["Ph = 3", "valid choices"]),
    ];

    [Theory]
    [MemberData(nameof(CliCases))]
    public void Cli_BadOption_ExitsNonZeroOnceNamingTheOptionAndWritesNothing(CliCase c)
    {
        string o = Path.Combine(_dir, "o.npy");
        // --out needs --attention; cases without one cannot write anyway.
        string outArg = c.Args.Contains("--attention", StringComparison.Ordinal) ? $" --out {o}" : "";
        string ranks = c.Args.Contains("--ranks", StringComparison.Ordinal) ? "" : "--ranks 4 ";
        var r = Dsattn.Run($"run {ranks}{c.Args} --no-progress{outArg}", TimeSpan.FromSeconds(60), output);
        Assert.Equal(c.Exit, r.ExitCode);
        foreach (string s in c.Says) Assert.Contains(s, r.Stderr, StringComparison.Ordinal);
        Assert.DoesNotContain("   at ", r.Stderr + r.Stdout, StringComparison.Ordinal);
        Assert.DoesNotContain("Exception", r.Stderr, StringComparison.Ordinal);
        // Refused before ranks start: said once, no rank ever ran.
        Assert.DoesNotContain("failed:", r.Stderr, StringComparison.Ordinal);
        Assert.DoesNotContain("rank 0/", r.Stdout, StringComparison.Ordinal);
        Assert.Empty(Directory.GetFileSystemEntries(_dir));
    }

    [Fact]
    public void Cli_CheckFinite_NaNInAnInput_NamesTensorAndFirstIndex_WritesNothing()
    {
        const int B = 1, N = 64, H = 2, D = 8;
        var q = new float[B * N * H * D];
        var rng = new Random(3);
        for (int i = 0; i < q.Length; i++) q[i] = (float)(rng.NextDouble() - 0.5);
        var k = (float[])q.Clone();
        var v = (float[])q.Clone();
        // K[b=0, n=41, h=1, d=5] is NaN; rank 1 of 2 (zigzag over 64 tokens) owns token 41.
        k[((0 * N + 41) * H + 1) * D + 5] = float.NaN;
        v[((0 * N + 50) * H + 0) * D + 2] = float.PositiveInfinity;
        foreach (var (name, data) in new[] { ("q", q), ("k", k), ("v", v) })
        {
            using var w = NpyWriter.Create(Path.Combine(_dir, name + ".npy"), [B, N, H, D]);
            w.Write(0, data);
        }
        string o = Path.Combine(_dir, "o.npy");
        string args = $"run --ranks 2 --attention softmax --scheme allgather --q {_dir}/q.npy --k {_dir}/k.npy --v {_dir}/v.npy --out {o} --backend cpu --no-progress";
        var r = Dsattn.Run(args + " --check-finite", TimeSpan.FromSeconds(60), output);
        Assert.Equal(2, r.ExitCode);
        Assert.Contains("--check-finite", r.Stderr, StringComparison.Ordinal);
        Assert.Contains("K has 1 NaN/Inf value(s), first K[b=0, n=41, h=1, d=5] = NaN", r.Stderr, StringComparison.Ordinal);
        Assert.Contains("V has 1 NaN/Inf value(s), first V[b=0, n=50, h=0, d=2] = ∞", r.Stderr.Replace("Infinity", "∞", StringComparison.Ordinal), StringComparison.Ordinal);
        Assert.DoesNotContain("Q has", r.Stderr, StringComparison.Ordinal);
        Assert.DoesNotContain("   at ", r.Stderr, StringComparison.Ordinal);
        Assert.False(File.Exists(o));
        Assert.Empty(Directory.GetFiles(_dir, ".*"));

        // Without the scan the run goes on, and --check reports the non-finite outputs in full (every row, not only sampled ones).
        var unchecked_ = Dsattn.Run(args.Replace($" --out {o}", "", StringComparison.Ordinal) + " --check", TimeSpan.FromSeconds(60), output);
        Assert.Equal(1, unchecked_.ExitCode);
        Assert.Contains("check finite outputs: rank", unchecked_.Stdout, StringComparison.Ordinal);
        Assert.Contains("O has", unchecked_.Stdout, StringComparison.Ordinal);
        Assert.Contains("FAILED", unchecked_.Stdout, StringComparison.Ordinal);
        Assert.False(File.Exists(o));
    }

    [Fact]
    public void Cli_CheckFinite_CleanInputs_RunsAndReportsFiniteOutputs()
    {
        var r = Dsattn.Run("run --ranks 2 --attention lightning --scheme lasp2 --seq 64 --heads 2 --head-dim 8 --decay 0.9 --backward --check --check-finite --backend cpu --no-progress",
            TimeSpan.FromSeconds(60), output);
        Assert.True(r.ExitCode == 0, r.Stdout + r.Stderr);
        Assert.Contains("check finite outputs: every element of every output is finite ok", r.Stdout, StringComparison.Ordinal);
    }

    /// <summary>Environment errors: each ends the launch quickly, non-zero, naming the line or the variable and the fix.</summary>
    [Fact]
    public void Cli_Launch_HostfileErrors_NameTheLine_UnresolvableHostRefusedBeforeMpiexec()
    {
        string bad = Path.Combine(_dir, "bad-hosts.txt");
        File.WriteAllText(bad, "# cluster\nlocalhost:2\nnode2 slots=x\n");
        var r = Dsattn.Run($"launch --hostfile {bad} -n 2 -- run --attention softmax --seq 64 --backend cpu", TimeSpan.FromSeconds(60), output);
        Assert.Equal(2, r.ExitCode);
        Assert.Contains($"{bad}:3: slot count 'x'", r.Stderr, StringComparison.Ordinal);
        Assert.DoesNotContain("   at ", r.Stderr, StringComparison.Ordinal);

        // Once mpiexec hung here: ssh failed for the second host and the first rank waited in MPI_Init.
        string unknown = Path.Combine(_dir, "unknown-hosts.txt");
        File.WriteAllText(unknown, "localhost:1\nno-such-host.invalid:1\n");
        var sw = Stopwatch.StartNew();
        r = Dsattn.Run($"launch --hostfile {unknown} -n 2 -- run --attention softmax --seq 64 --backend cpu", TimeSpan.FromSeconds(60), output);
        Assert.Equal(2, r.ExitCode);
        Assert.Contains($"{unknown}:2: host 'no-such-host.invalid' cannot be reached", r.Stderr, StringComparison.Ordinal);
        Assert.Contains("nothing was started", r.Stderr, StringComparison.Ordinal);
        Assert.DoesNotContain("mpiexec", r.Stdout, StringComparison.Ordinal);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(30), $"took {sw.Elapsed}");
        File.Delete(bad);
        File.Delete(unknown);
    }

    /// <summary>An environment case of <c>dsattn launch</c>: a hostfile (null: none), extra launch options, environment
    /// variables, and what stderr must say (each bad host once, with its line).</summary>
    public sealed record LaunchCase(string Name, string? Hosts, string Options, string? Library, string[] Says, string[] Once)
    {
        public override string ToString() => Name;
    }

    public static TheoryData<LaunchCase> LaunchCases() =>
    [
        // 192.0.2.1 is TEST-NET-1 (RFC 5737), never routed: the probe gets no answer, no route, or a firewall's refusal.
        new("unreachable host (TEST-NET address, ssh port)", "localhost:2\n192.0.2.1:2\n", "--host-check-timeout 1", null,
            ["TCP port 22 (ssh", "'ssh 192.0.2.1' works", "--host-check-port"], [":2: host '192.0.2.1' cannot be reached"]),
        new("unreachable host on a port given", "192.0.2.1\n", "--host-check-port 9 --host-check-timeout 1", null,
            ["TCP port 9 ("], [":1: host '192.0.2.1' cannot be reached"]),
        new("unresolvable and unreachable hosts, each named once", "# cluster\nlocalhost\nno-such-host.invalid:4\n192.0.2.1 slots=2\n", "--host-check-timeout 1", null,
            ["does not resolve", "Fix the name"], [":3: host 'no-such-host.invalid' cannot be reached", ":4: host '192.0.2.1' cannot be reached"]),
        new("unresolvable host, port probe off", "node7.invalid\n", "--host-check-port 0 --host-check-timeout 1", null,
            ["does not resolve"], [":1: host 'node7.invalid' cannot be reached"]),
        new("negative host-check port", "localhost\n", "--host-check-port -1", null, ["--host-check-port must be a TCP port 1 to 65535, or 0"], []),
        new("zero host-check timeout", "localhost\n", "--host-check-timeout 0", null, ["--host-check-timeout must be a positive number of seconds"], []),
        new("MPI library missing", null, "", "/nonexistent/libmpich.so.12",
            ["could not be loaded (no such file)", "apt-get install -y mpich", "Nothing was started"], ["DSATTN_MPI_LIBRARY=/nonexistent/libmpich.so.12"]),
        new("MPI library that is not MPI", null, "", "libc.so.6",
            ["not an MPI-3 library", "apt-get install -y mpich", "Nothing was started"], ["libc.so.6 has no MPI_Get_library_version"]),
    ];

    /// <summary>Environment errors of a launch: refused before mpiexec starts (no command line printed, no rank ran),
    /// once, naming the hostfile line or the library and the fix, in a few seconds.</summary>
    [Theory]
    [MemberData(nameof(LaunchCases))]
    public void Cli_Launch_EnvironmentError_RefusedOnceBeforeMpiexec(LaunchCase c)
    {
        string hostArg = "";
        string hosts = Path.Combine(_dir, "hosts.txt");
        if (c.Hosts is not null)
        {
            File.WriteAllText(hosts, c.Hosts);
            hostArg = $"--hostfile {hosts} ";
        }
        var env = new Dictionary<string, string?> { [MpichLibrary.LibraryVariable] = c.Library, ["HYDRA_LAUNCHER"] = null };
        var sw = Stopwatch.StartNew();
        var r = Dsattn.Run($"launch {hostArg}{c.Options} -n 2 -- run --attention softmax --seq 64 --backend cpu --no-progress", TimeSpan.FromSeconds(60), output, env);
        sw.Stop();
        Assert.Equal(2, r.ExitCode);
        foreach (string s in c.Says) Assert.Contains(s, r.Stderr, StringComparison.Ordinal);
        foreach (string s in c.Once)
        {
            string said = c.Hosts is null ? s : hosts + s;
            Assert.Equal(1, r.Stderr.Split(said).Length - 1);
        }
        Assert.DoesNotContain("   at ", r.Stderr + r.Stdout, StringComparison.Ordinal);
        Assert.DoesNotContain("mpiexec", r.Stdout, StringComparison.Ordinal);
        Assert.DoesNotContain("rank 0/", r.Stdout, StringComparison.Ordinal);
        Assert.Equal(c.Hosts is null ? 0 : 1, Directory.GetFileSystemEntries(_dir).Length);
        // Lookup and probe are each limited to the 1 s timeout; the rest is starting dotnet on a busy machine.
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(15), $"took {sw.Elapsed}");
    }

    /// <summary>Under a bare mpiexec every rank would load the library and fail alike: rank 0 says it once, before MPI starts.</summary>
    [Fact]
    public void Cli_RunUnderMpiexec_LibraryNotMpi_SaidOnceBeforeMpiStarts()
    {
        var r = Dsattn.RunMpi(2, "run --attention softmax --seq 64 --backend cpu --no-progress", TimeSpan.FromSeconds(60), output,
            new Dictionary<string, string?> { [MpichLibrary.LibraryVariable] = "libc.so.6" });
        Assert.NotEqual(0, r.ExitCode);
        string all = r.Stdout + r.Stderr;
        Assert.Equal(1, all.Split("libc.so.6 has no MPI_Get_library_version").Length - 1);
        Assert.Contains("No rank started MPI", all, StringComparison.Ordinal);
        Assert.DoesNotContain("failed:", all, StringComparison.Ordinal);
        Assert.DoesNotContain("   at ", all, StringComparison.Ordinal);
    }

    /// <summary>Four local tensors q [1, n, H, D], k, v [1, n, Hk, ·], o [1, n, H, Dv] of <see cref="Ok"/>, random.</summary>
    internal static LocalTensors Tensors(IKernelBackend backend, int n, int seed)
    {
        var t = new LocalTensors(backend.Allocate(1, n, Ok.Heads, Ok.HeadDim), backend.Allocate(1, n, Ok.KvHeads, Ok.HeadDim),
            backend.Allocate(1, n, Ok.KvHeads, Ok.ValueDim), backend.Allocate(1, n, Ok.Heads, Ok.ValueDim));
        var rng = new Random(seed);
        foreach (var x in new[] { t.Q, t.K, t.V })
        {
            var a = new float[x.Length];
            for (int i = 0; i < a.Length; i++) a[i] = (float)(rng.NextDouble() * 2 - 1);
            x.CopyFromHost(a);
        }
        return t;
    }

    internal sealed record LocalTensors(DeviceTensor Q, DeviceTensor K, DeviceTensor V, DeviceTensor O) : IDisposable
    {
        public void Dispose()
        {
            Q.Dispose();
            K.Dispose();
            V.Dispose();
            O.Dispose();
        }
    }
}
