using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using Distributed.Kernels;
using Spectre.Console;

namespace Distributed.Cli.Commands;

/// <summary><c>dsattn bench kernels</c>: GFLOP/s of every block operation on one device.</summary>
internal static class BenchCommand
{
    /// <summary>One timed operation.</summary>
    internal sealed record Result(string Op, bool Causal, int B, int H, int N, int D, double Ms, double Gflops);

    public static Command Create()
    {
        var backend = new Option<string>("--backend") { Description = $"Kernel backend: {string.Join(", ", KernelBackends.Names)}.", DefaultValueFactory = _ => "auto" };
        backend.AcceptOnlyFromAmong([.. KernelBackends.Names]);
        var shape = new Option<string>("--shape") { Description = "B,H,N,D (batch, heads, tokens, head dim).", DefaultValueFactory = _ => "1,8,4096,64" };
        var iterations = new Option<int>("--iterations") { Description = "Timed repetitions per operation (the fastest is reported).", DefaultValueFactory = _ => 3 };
        var json = new Option<string?>("--json") { Description = "Also write the results as a JSON array of {op, causal, b, h, n, d, ms, gflops}." };
        var ops = new Option<string>("--ops") { Description = "Comma-separated subset of: flash-forward, flash-backward, lightning-forward, lightning-backward.", DefaultValueFactory = _ => "flash-forward,flash-backward,lightning-forward,lightning-backward" };
        var peak = new Option<double?>("--peak-tflops") { Description = "The device's fp32 peak in TFLOP/s, for the 'of peak' column. Default: looked up from a CUDA device's SMs, compute capability and clock." };
        var kernels = new Command("kernels", "Time every block operation (causal and non-causal) on one device and print GFLOP/s. FLOPs: flash forward 4·B·H·N²·D (half when causal), backward 2.5× forward; lightning forward 2·B·H·N·(C·(D+Dv)/2 + 2·D·Dv) causal with C = 64 the block, 4·B·H·N·D·Dv non-causal; backward 2× forward.")
        {
            backend, shape, iterations, json, ops, peak,
        };
        kernels.SetAction(parse =>
        {
            if (!TryParseShape(parse.GetValue(shape)!, out int b, out int h, out int n, out int d))
            {
                Console.Error.WriteLine($"dsattn bench kernels: --shape must be four positive integers B,H,N,D (got '{parse.GetValue(shape)}'), e.g. --shape 1,8,4096,64.");
                return 2;
            }
            int k = parse.GetValue(iterations);
            if (k < 1)
            {
                Console.Error.WriteLine($"dsattn bench kernels: --iterations must be at least 1 (got {k}).");
                return 2;
            }
            var wanted = parse.GetValue(ops)!.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries).ToHashSet();
            string[] known = ["flash-forward", "flash-backward", "lightning-forward", "lightning-backward"];
            if (wanted.FirstOrDefault(w => !known.Contains(w)) is { } bad)
            {
                Console.Error.WriteLine($"dsattn bench kernels: unknown op '{bad}' in --ops; use {string.Join(", ", known)}.");
                return 2;
            }
            string? jsonPath = parse.GetValue(json);
            if (jsonPath is not null && Path.GetDirectoryName(Path.GetFullPath(jsonPath)) is { } dir && !Directory.Exists(dir))
            {
                Console.Error.WriteLine($"dsattn bench kernels: --json: the folder '{dir}' does not exist; create it or write elsewhere.");
                return 2;
            }
            if (parse.GetValue(peak) is { } given && !(given > 0))
            {
                Console.Error.WriteLine($"dsattn bench kernels: --peak-tflops must be positive (got {given.ToString(CultureInfo.InvariantCulture)}), e.g. --peak-tflops 67 for an H100 SXM.");
                return 2;
            }
            using var be = KernelBackends.Create(parse.GetValue(backend)!);
            var results = Run(be, b, h, n, d, k, wanted);
            double? peakTflops = parse.GetValue(peak) ?? Distributed.Kernels.Ilgpu.Fp32Peak.Of(be);
            var table = new Table().Title(Markup.Escape($"{be.Name}: B={b} H={h} N={n} D={d}, best of {k}")).AddColumns("op", "causal", "ms", "GFLOP/s");
            if (peakTflops is not null) table.AddColumns("TFLOP/s", Markup.Escape($"of fp32 peak ({peakTflops.Value.ToString("F1", CultureInfo.InvariantCulture)})"));
            foreach (var r in results)
            {
                string[] cells = [r.Op, r.Causal ? "yes" : "no", r.Ms.ToString("F1", CultureInfo.InvariantCulture), r.Gflops.ToString("F1", CultureInfo.InvariantCulture)];
                if (peakTflops is { } p) cells = [.. cells, (r.Gflops / 1e3).ToString("F2", CultureInfo.InvariantCulture), (r.Gflops / 1e3 / p).ToString("P1", CultureInfo.InvariantCulture)];
                table.AddRow(cells);
            }
            AnsiConsole.Write(table);
            if (jsonPath is not null)
            {
                string path = Path.GetFullPath(jsonPath), tmp = path + ".tmp-" + Environment.ProcessId.ToString(CultureInfo.InvariantCulture);
                File.WriteAllText(tmp, JsonSerializer.Serialize(results.Select(r => new { op = r.Op, causal = r.Causal, b = r.B, h = r.H, n = r.N, d = r.D, ms = r.Ms, gflops = r.Gflops }), new JsonSerializerOptions { WriteIndented = true }));
                File.Move(tmp, path, overwrite: true);
            }
            return 0;
        });
        var command = new Command("bench", "Benchmarks: `bench kernels` times the block operations of one device.");
        command.Subcommands.Add(kernels);
        return command;
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
    internal static List<Result> Run(IKernelBackend be, int b, int h, int n, int d, int iterations, IReadOnlySet<string> wanted)
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
        var decay = Distributed.SequenceParallelAttention.DefaultDecay(h);
        var results = new List<Result>();
        // Each step returns the milliseconds of the operation it times.
        var steps = new List<(string Op, bool Causal, Func<double> Measure, double Flop)>();
        foreach (bool causal in new[] { false, true })
        {
            double flash = 4.0 * b * h * (double)n * n * d * (causal ? 0.5 : 1.0);
            double lightning = causal ? 2.0 * b * h * n * (64.0 * (d + d) / 2 + 2.0 * d * d) : 4.0 * b * h * n * d * d;
            var opt = new FlashOptions(Causal: causal);
            if (wanted.Contains("flash-forward")) steps.Add(("flash-forward", causal, () => Time(be, () => be.FlashForward(q, k, v, o, lse, opt)), flash));
            if (wanted.Contains("flash-backward"))
                steps.Add(("flash-backward", causal, () =>
                {
                    // The backward needs the forward's LSE and Drow; only the backward is timed.
                    be.FlashForward(q, k, v, o, lse, opt);
                    be.SoftmaxRowDot(o, dO, drow);
                    return Time(be, () => be.FlashBackward(q, k, v, lse, drow, dO, dq, dk, dv, opt));
                }, 2.5 * flash));
            if (wanted.Contains("lightning-forward")) steps.Add(("lightning-forward", causal, () => Time(be, () => be.LightningForward(q, k, v, decay, causal, null, o, null)), lightning));
            if (wanted.Contains("lightning-backward")) steps.Add(("lightning-backward", causal, () => Time(be, () => be.LightningBackward(q, k, v, decay, causal, null, dO, null, dq, dk, dv, null)), 2 * lightning));
        }
        AnsiConsole.Progress().AutoClear(true).Start(ctx =>
        {
            var task = ctx.AddTask("timing", maxValue: steps.Count);
            foreach (var (op, causal, measure, flop) in steps)
            {
                task.Description = $"{op} {(causal ? "causal" : "full")}";
                measure(); // warm-up
                double best = double.MaxValue;
                for (int i = 0; i < iterations; i++) best = Math.Min(best, measure());
                results.Add(new Result(op, causal, b, h, n, d, best, flop / (best * 1e6)));
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
