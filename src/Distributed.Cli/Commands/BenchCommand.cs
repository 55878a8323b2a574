using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using Distributed.Kernels;
using Distributed.Kernels.Cpu;
using Spectre.Console;

namespace Distributed.Cli.Commands;

/// <summary>
/// <c>dsattn bench kernels</c>: GFLOP/s of every block operation on one device, optionally in rounds that
/// alternate with the libtorch peer (<c>benchmarks/Distributed.Benchmarks.Torch</c>), so one command gives
/// both sides of the table and the same-run 2048³ GEMM ceiling.
/// </summary>
internal static class BenchCommand
{
    /// <summary>One timed operation: the best round's time, and the worst round's best as the spread.</summary>
    internal sealed record Result(string Op, bool Causal, int B, int H, int N, int D, double Ms, double Gflops,
        string Side = "ours", double GflopsWorst = double.NaN, double Gbps = double.NaN, int Rounds = 1);

    /// <summary>Every operation <c>--ops</c> accepts, in the order they run.</summary>
    internal static readonly string[] Ops =
    [
        "flash-forward", "flash-backward", "lightning-forward", "lightning-backward",
        "softmax-row-dot", "merge-softmax", "copy-slice", "lightning-chunk-state", "lightning-chunk-state-backward",
        "lightning-inter-chunk-forward", "lightning-inter-chunk-backward",
    ];

    private const string PeerProject = "benchmarks/Distributed.Benchmarks.Torch/Distributed.Benchmarks.Torch.csproj";

    public static Command Create()
    {
        var backend = new Option<string>("--backend") { Description = $"Kernel backend: {string.Join(", ", KernelBackends.Names)}.", DefaultValueFactory = _ => "auto" };
        backend.AcceptOnlyFromAmong([.. KernelBackends.Names]);
        var shape = new Option<string>("--shape") { Description = "B,H,N,D (batch, heads, tokens, head dim).", DefaultValueFactory = _ => "1,8,4096,64" };
        var iterations = new Option<int>("--iterations") { Description = "Timed repetitions per operation and round (the fastest counts).", DefaultValueFactory = _ => 3 };
        var rounds = new Option<int>("--rounds") { Description = "Rounds; with --peer each round runs ours, then the peer. The best round is reported, the worst as the spread.", DefaultValueFactory = _ => 1 };
        var json = new Option<string?>("--json") { Description = "Also write the results as a JSON array of {op, causal, b, h, n, d, ms, gflops, side, gflops_worst, gbps, rounds, isa}." };
        var ops = new Option<string>("--ops") { Description = $"Comma-separated subset of: {string.Join(", ", Ops)}.", DefaultValueFactory = _ => string.Join(",", Ops) };
        var peer = new Option<string>("--peer") { Description = $"Also time a peer library in alternating rounds: none, or libtorch (builds and runs {PeerProject}; its SDPA at the same shape and its fp32 2048³ GEMM).", DefaultValueFactory = _ => "none" };
        peer.AcceptOnlyFromAmong("none", "libtorch");
        var isa = new Option<string>("--isa") { Description = "CPU backend vector path: auto, avx512, avx2 or scalar.", DefaultValueFactory = _ => "auto" };
        isa.AcceptOnlyFromAmong(["auto", .. CpuBackend.IsaNames]);
        var markdown = new Option<string?>("--markdown") { Description = "Also write the results as the README's Markdown table (ISA, rounds, same-run GEMM ceiling, spread)." };
        var peak = new Option<double?>("--peak-tflops") { Description = "The device's fp32 peak in TFLOP/s, for the TFLOP/s and 'of fp32 peak' columns. Default: looked up from a CUDA device's SMs, compute capability and clock (none on the CPU backend)." };
        var decayOpt = new Option<float?>("--decay") { Description = "Lightning decay λ in (0, 1] for every head (default: the ALiBi-style per-head decays of DefaultDecay)." };
        var kernels = new Command("kernels", "Time every block operation (causal and non-causal) on one device and print GFLOP/s. FLOPs: flash forward 4·B·H·N²·D (half when causal), backward 2.5× forward; lightning forward 2·B·H·N·(C·(D+Dv)/2 + 2·D·Dv) causal with C = 64 the block, 4·B·H·N·D·Dv non-causal; backward 2× forward; chunk state and its backward 2·B·H·N·D·Dv; row dot 2·B·N·H·D, merge 3·B·N·H·D; copy-slice moves half the tokens (GB/s only).")
        {
            backend, shape, iterations, rounds, json, ops, peer, isa, decayOpt, markdown, peak,
        };
        kernels.SetAction(parse =>
        {
            if (!TryParseShape(parse.GetValue(shape)!, out int b, out int h, out int n, out int d))
            {
                Console.Error.WriteLine($"dsattn bench kernels: --shape must be four positive integers B,H,N,D (got '{parse.GetValue(shape)}'), e.g. --shape 1,8,4096,64.");
                return 2;
            }
            int k = parse.GetValue(iterations), r = parse.GetValue(rounds);
            if (k < 1 || r < 1)
            {
                Console.Error.WriteLine($"dsattn bench kernels: --iterations and --rounds must be at least 1 (got {k} and {r}).");
                return 2;
            }
            var wanted = parse.GetValue(ops)!.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries).ToHashSet();
            if (wanted.FirstOrDefault(w => !Ops.Contains(w)) is { } bad)
            {
                Console.Error.WriteLine($"dsattn bench kernels: unknown op '{bad}' in --ops; use {string.Join(", ", Ops)}.");
                return 2;
            }
            string? jsonPath = parse.GetValue(json), markdownPath = parse.GetValue(markdown);
            foreach (var (name, file) in new[] { ("--json", jsonPath), ("--markdown", markdownPath) })
                if (file is not null && Path.GetDirectoryName(Path.GetFullPath(file)) is { } dir && !Directory.Exists(dir))
                {
                    Console.Error.WriteLine($"dsattn bench kernels: {name}: the folder '{dir}' does not exist; create it or write elsewhere.");
                    return 2;
                }
            float? lambda = parse.GetValue(decayOpt);
            if (lambda is { } l && !(l > 0f && l <= 1f))
            {
                Console.Error.WriteLine($"dsattn bench kernels: --decay must be in (0, 1] (got {l.ToString(CultureInfo.InvariantCulture)}), e.g. --decay 0.9.");
                return 2;
            }
            if (parse.GetValue(peak) is { } given && !(given > 0))
            {
                Console.Error.WriteLine($"dsattn bench kernels: --peak-tflops must be positive (got {given.ToString(CultureInfo.InvariantCulture)}), e.g. --peak-tflops 67 for an H100 SXM.");
                return 2;
            }
            try { CpuBackend.UseIsa(parse.GetValue(isa)!); }
            catch (ArgumentException e)
            {
                Console.Error.WriteLine($"dsattn bench kernels: --isa: {e.Message}");
                return 2;
            }
            string? peerDll = null;
            if (parse.GetValue(peer) == "libtorch" && (peerDll = BuildPeer(out string buildFailure)) is null)
            {
                Console.Error.WriteLine($"dsattn bench kernels: --peer libtorch: {buildFailure}");
                return 1;
            }
            using var be = KernelBackends.Create(parse.GetValue(backend)!);
            var ours = new List<List<Result>>();
            var theirs = new List<List<Result>>();
            for (int round = 0; round < r; round++)
            {
                ours.Add(Run(be, b, h, n, d, k, wanted, lambda));
                if (peerDll is not null)
                {
                    var p = RunPeer(peerDll, b, h, n, d, k, out string failure);
                    if (p is null)
                    {
                        Console.Error.WriteLine($"dsattn bench kernels: --peer libtorch: {failure}");
                        return 1;
                    }
                    theirs.Add(p);
                }
            }
            var results = Best(ours);
            results.AddRange(theirs.Count > 0 ? Best(theirs) : []);
            string isaName = be.Name == "cpu" ? CpuBackend.Isa : "n/a";
            Print(results, be.Name, isaName, b, h, n, d, k, r);
            if ((parse.GetValue(peak) ?? Distributed.Kernels.Ilgpu.Fp32Peak.Of(be)) is { } peakTflops)
            {
                var table = new Table().Title(Markup.Escape($"{be.Name}: against an fp32 peak of {peakTflops.ToString("F1", CultureInfo.InvariantCulture)} TFLOP/s"))
                    .AddColumns("op", "causal", "TFLOP/s", "of fp32 peak");
                foreach (var x in results.Where(x => x.Side == "ours" && x.Gflops > 0))
                    table.AddRow(x.Op, x.Causal ? "yes" : "no", (x.Gflops / 1e3).ToString("F2", CultureInfo.InvariantCulture), (x.Gflops / 1e3 / peakTflops).ToString("P1", CultureInfo.InvariantCulture));
                AnsiConsole.Write(table);
            }
            if (markdownPath is not null) WriteAtomically(markdownPath, Markdown(results, isaName, b, h, n, d, k, r));
            if (jsonPath is not null)
            {
                WriteAtomically(jsonPath, JsonSerializer.Serialize(results.Select(x => new
                {
                    op = x.Op, causal = x.Causal, b = x.B, h = x.H, n = x.N, d = x.D, ms = x.Ms, gflops = x.Gflops,
                    side = x.Side, gflops_worst = x.GflopsWorst, gbps = double.IsNaN(x.Gbps) ? (double?)null : x.Gbps, rounds = x.Rounds,
                    isa = x.Side == "ours" ? isaName : "libtorch",
                }), new JsonSerializerOptions { WriteIndented = true }));
            }
            return 0;
        });
        var command = new Command("bench", "Benchmarks: `bench kernels` times the block operations of one device; `bench scaling` sweeps schemes × P × N.");
        command.Subcommands.Add(kernels);
        command.Subcommands.Add(Distributed.Cli.Scaling.ScalingCommand.Create());
        return command;
    }

    /// <summary>Per (side, op, causal): the best round, with the worst round's best as the spread.</summary>
    private static List<Result> Best(List<List<Result>> rounds) =>
        [.. rounds.SelectMany(x => x).GroupBy(x => (x.Side, x.Op, x.Causal)).Select(g =>
        {
            var best = g.MinBy(x => x.Ms)!;
            return best with { GflopsWorst = g.Min(x => x.Gflops), Rounds = g.Count(), Gbps = g.Max(x => x.Gbps) };
        })];

    private static void WriteAtomically(string file, string text)
    {
        string path = Path.GetFullPath(file), tmp = path + ".tmp-" + Environment.ProcessId.ToString(CultureInfo.InvariantCulture);
        File.WriteAllText(tmp, text);
        File.Move(tmp, path, overwrite: true);
    }

    /// <summary>The README table: every op of ours, libtorch's SDPA beside the flash forward, and the GEMM ceiling.</summary>
    internal static string Markdown(List<Result> results, string isa, int b, int h, int n, int d, int k, int r)
    {
        string F(double x) => double.IsNaN(x) ? "–" : x.ToString("F1", CultureInfo.InvariantCulture);
        string R(double x) => double.IsNaN(x) || double.IsInfinity(x) ? "–" : x.ToString("F2", CultureInfo.InvariantCulture);
        var gemm = results.FirstOrDefault(x => x.Op == "libtorch-gemm-2048");
        var forward = results.Where(x => x.Op == "flash-forward" && x.Side == "ours").ToDictionary(x => x.Causal, x => x.Gflops);
        var sb = new System.Text.StringBuilder();
        sb.AppendLine(CultureInfo.InvariantCulture, $"CPU path {isa}, {Environment.ProcessorCount} threads, B={b} H={h} N={n} D={d} fp32; best of {k} per round, {r} round(s){(gemm is null ? "" : ", alternating with libtorch")}; \"worst\" is the worst round's best.");
        if (gemm is not null)
            sb.AppendLine(CultureInfo.InvariantCulture, $"Same-run ceiling: libtorch fp32 GEMM 2048³ {F(gemm.Gflops)} GFLOP/s (worst round {F(gemm.GflopsWorst)}).");
        sb.AppendLine();
        sb.AppendLine("| operation | causal | ours GFLOP/s (worst) | GB/s | libtorch GFLOP/s (worst) | ours / libtorch | ours / GEMM | note |");
        sb.AppendLine("|---|---|---|---|---|---|---|---|");
        foreach (var x in results.Where(x => x.Side == "ours"))
        {
            var peer = x.Op == "flash-forward" ? results.FirstOrDefault(p => p.Op == "libtorch-sdpa" && p.Causal == x.Causal) : null;
            string note = x.Op == "flash-backward" && forward.TryGetValue(x.Causal, out double fw) ? $"{R(x.Gflops / fw)} × our forward" : "";
            sb.AppendLine(CultureInfo.InvariantCulture,
                $"| {x.Op} | {(x.Causal ? "yes" : "no")} | {(x.Gflops > 0 ? $"{F(x.Gflops)} ({F(x.GflopsWorst)})" : "–")} | {F(x.Gbps)} | {(peer is null ? "–" : $"{F(peer.Gflops)} ({F(peer.GflopsWorst)})")} | {(peer is null ? "–" : R(x.Gflops / peer.Gflops))} | {(gemm is null || x.Gflops <= 0 ? "–" : R(x.Gflops / gemm.Gflops))} | {note} |");
        }
        return sb.ToString();
    }

    private static void Print(List<Result> results, string backend, string isa, int b, int h, int n, int d, int k, int r)
    {
        double gemm = results.FirstOrDefault(x => x.Op == "libtorch-gemm-2048")?.Gflops ?? double.NaN;
        string F(double x) => double.IsNaN(x) ? "–" : x.ToString("F1", CultureInfo.InvariantCulture);
        string R(double x) => double.IsNaN(x) ? "–" : x.ToString("F2", CultureInfo.InvariantCulture);
        var table = new Table().Title(Markup.Escape($"{backend} ({isa}): B={b} H={h} N={n} D={d}, best of {k} per round, {r} round(s)"))
            .AddColumns("op", "causal", "side", "ms", "GFLOP/s", "worst round", "GB/s", "vs libtorch", "of GEMM");
        foreach (var x in results)
        {
            double peerRate = x.Op == "flash-forward"
                ? results.FirstOrDefault(p => p.Op == "libtorch-sdpa" && p.Causal == x.Causal)?.Gflops ?? double.NaN : double.NaN;
            table.AddRow(x.Op, x.Causal ? "yes" : "no", x.Side, x.Ms.ToString("F1", CultureInfo.InvariantCulture), F(x.Gflops), F(x.GflopsWorst), F(x.Gbps),
                R(x.Gflops / peerRate), x.Gflops > 0 ? R(x.Gflops / gemm) : "–");
        }
        AnsiConsole.Write(table);
    }

    /// <summary>Builds the libtorch peer (Release) and returns its dll, or null with the reason.</summary>
    private static string? BuildPeer(out string why)
    {
        why = "";
        string? project = null;
        foreach (var start in new[] { Environment.CurrentDirectory, AppContext.BaseDirectory })
            for (var dir = new DirectoryInfo(start); dir is not null && project is null; dir = dir.Parent)
                if (File.Exists(Path.Combine(dir.FullName, PeerProject))) project = Path.Combine(dir.FullName, PeerProject);
        if (project is null)
        {
            why = $"cannot find {PeerProject} above the current folder or dsattn; run from the repository.";
            return null;
        }
        AnsiConsole.MarkupLine(Markup.Escape($"building the libtorch peer ({project}); the first restore downloads about 500 MB"));
        var (code, _, err) = Exec("dotnet", ["build", project, "-c", "Release", "-nologo", "-v", "q"]);
        string dll = Path.Combine(Path.GetDirectoryName(project)!, "bin", "Release", "net10.0", "linux-x64", "Distributed.Benchmarks.Torch.dll");
        if (code != 0 || !File.Exists(dll))
        {
            why = $"dotnet build {project} failed (exit {code}): {err.Trim()}";
            return null;
        }
        return dll;
    }

    /// <summary>One round of the peer: its JSON lines as results, or null with the reason.</summary>
    private static List<Result>? RunPeer(string dll, int b, int h, int n, int d, int iterations, out string why)
    {
        why = "";
        var (code, output, err) = Exec("dotnet", [dll, .. new[] { b, h, n, d, iterations }.Select(x => x.ToString(CultureInfo.InvariantCulture))]);
        if (code != 0)
        {
            why = $"the peer exited with {code}: {err.Trim()}";
            return null;
        }
        var list = new List<Result>();
        foreach (var line in output.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            if (!line.StartsWith('{')) continue;
            using var doc = JsonDocument.Parse(line);
            var e = doc.RootElement;
            list.Add(new Result(e.GetProperty("op").GetString()!, e.GetProperty("causal").GetBoolean(), e.GetProperty("b").GetInt32(), e.GetProperty("h").GetInt32(),
                e.GetProperty("n").GetInt32(), e.GetProperty("d").GetInt32(), e.GetProperty("ms").GetDouble(), e.GetProperty("gflops").GetDouble(), "libtorch"));
        }
        if (list.Count == 0) why = $"the peer printed no results: {output.Trim()} {err.Trim()}";
        return list.Count == 0 ? null : list;
    }

    private static (int Code, string Output, string Error) Exec(string file, IEnumerable<string> args)
    {
        var psi = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        var err = p.StandardError.ReadToEndAsync();
        string output = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        return (p.ExitCode, output, err.Result);
    }

    private static bool TryParseShape(string text, out int b, out int h, out int n, out int d)
    {
        b = h = n = d = 0;
        var parts = text.Split(',');
        if (parts.Length != 4) return false;
        var v = new int[4];
        for (int i = 0; i < 4; i++)
            if (!int.TryParse(parts[i], NumberStyles.None, CultureInfo.InvariantCulture, out v[i]) || v[i] < 1) return false;
        (b, h, n, d) = (v[0], v[1], v[2], v[3]);
        return true;
    }

    /// <summary>Times each wanted operation (one warm-up, then the best of <paramref name="iterations"/>).</summary>
    internal static List<Result> Run(IKernelBackend be, int b, int h, int n, int d, int iterations, IReadOnlySet<string> wanted, float? lambda = null)
    {
        var rnd = new Random(1);
        DeviceTensor Fill(params int[] shape)
        {
            var t = be.Allocate(shape);
            var host = new float[t.Length];
            for (int i = 0; i < host.Length; i++) host[i] = (float)(rnd.NextDouble() * 2 - 1) * 0.5f;
            t.CopyFromHost(host);
            return t;
        }
        using var q = Fill(b, n, h, d);
        using var k = Fill(b, n, h, d);
        using var v = Fill(b, n, h, d);
        using var dO = Fill(b, n, h, d);
        using var o = be.Allocate(b, n, h, d);
        using var lse = be.Allocate(b, h, n);
        using var drow = be.Allocate(b, h, n);
        using var dq = be.Allocate(b, n, h, d);
        using var dk = be.Allocate(b, n, h, d);
        using var dv = be.Allocate(b, n, h, d);
        using var m = be.Allocate(b, h, d, d);
        using var half = be.Allocate(b, n - n / 2, h, d);
        var decay = lambda is { } l ? Enumerable.Repeat(l, h).ToArray() : Distributed.SequenceParallelAttention.DefaultDecay(h);
        var results = new List<Result>();
        // Each step returns the milliseconds of the operation it times.
        var steps = new List<(string Op, bool Causal, Func<double> Measure, double Flop, double Bytes)>();
        double elems = (double)b * n * h * d;
        foreach (bool causal in new[] { false, true })
        {
            double flash = 4.0 * b * h * (double)n * n * d * (causal ? 0.5 : 1.0);
            double lightning = causal ? 2.0 * b * h * n * (64.0 * (d + d) / 2 + 2.0 * d * d) : 4.0 * b * h * n * d * d;
            var opt = new FlashOptions(Causal: causal);
            if (wanted.Contains("flash-forward")) steps.Add(("flash-forward", causal, () => Time(be, () => be.FlashForward(q, k, v, o, lse, opt)), flash, double.NaN));
            if (wanted.Contains("flash-backward"))
                steps.Add(("flash-backward", causal, () =>
                {
                    // The backward needs the forward's LSE and Drow; only the backward is timed.
                    be.FlashForward(q, k, v, o, lse, opt);
                    be.SoftmaxRowDot(o, dO, drow);
                    return Time(be, () => be.FlashBackward(q, k, v, lse, drow, dO, dq, dk, dv, opt));
                }, 2.5 * flash, double.NaN));
            if (wanted.Contains("lightning-forward")) steps.Add(("lightning-forward", causal, () => Time(be, () => be.LightningForward(q, k, v, decay, causal, null, o, null)), lightning, double.NaN));
            if (wanted.Contains("lightning-backward")) steps.Add(("lightning-backward", causal, () => Time(be, () => be.LightningBackward(q, k, v, decay, causal, null, dO, null, dq, dk, dv, null)), 2 * lightning, double.NaN));
            double state = 2.0 * b * h * n * (double)d * d;
            if (wanted.Contains("lightning-chunk-state")) steps.Add(("lightning-chunk-state", causal, () => Time(be, () => be.LightningChunkState(k, v, decay, causal, m)), state, double.NaN));
            if (wanted.Contains("lightning-chunk-state-backward")) steps.Add(("lightning-chunk-state-backward", causal, () => Time(be, () => be.LightningChunkStateBackward(q, dO, decay, causal, m)), state, double.NaN));
            // LASP-2's inter-chunk terms: o += λ^(i+1) q S0 (one product); dq, dk, dv from S0 and dS_end (three).
            if (wanted.Contains("lightning-inter-chunk-forward")) steps.Add(("lightning-inter-chunk-forward", causal, () => Time(be, () => be.LightningInterChunkForward(q, decay, causal, m, o)), state, double.NaN));
            if (wanted.Contains("lightning-inter-chunk-backward")) steps.Add(("lightning-inter-chunk-backward", causal, () => Time(be, () => be.LightningInterChunkBackward(q, k, v, decay, causal, m, dO, m, dq, dk, dv)), 3 * state, double.NaN));
        }
        // The per-row steps have no causal variant; they are listed once, as non-causal.
        if (wanted.Contains("softmax-row-dot")) steps.Add(("softmax-row-dot", false, () => Time(be, () => be.SoftmaxRowDot(q, dO, drow)), 2 * elems, 4 * (2 * elems + (double)b * h * n)));
        if (wanted.Contains("merge-softmax")) steps.Add(("merge-softmax", false, () => Time(be, () => be.MergeSoftmax(o, lse, v, drow)), 3 * elems, 4 * (3 * elems + 3.0 * b * h * n)));
        if (wanted.Contains("copy-slice")) steps.Add(("copy-slice", false, () => Time(be, () => be.CopySlice(q, 0, half, 0, n - n / 2, 1)), 0, 4 * 2.0 * b * (n - n / 2) * h * d));
        AnsiConsole.Progress().AutoClear(true).Start(ctx =>
        {
            var task = ctx.AddTask("timing", maxValue: steps.Count);
            foreach (var (op, causal, measure, flop, bytes) in steps)
            {
                task.Description = $"{op} {(causal ? "causal" : "full")}";
                measure(); // warm-up
                double best = double.MaxValue;
                for (int i = 0; i < iterations; i++) best = Math.Min(best, measure());
                results.Add(new Result(op, causal, b, h, n, d, best, flop / (best * 1e6), Gbps: bytes / (best * 1e6)));
                task.Increment(1);
            }
        });
        return results;
    }

    private static double Time(IKernelBackend be, Action work)
    {
        be.Synchronize();
        var sw = Stopwatch.StartNew();
        work();
        be.Synchronize();
        return sw.Elapsed.TotalMilliseconds;
    }
}
