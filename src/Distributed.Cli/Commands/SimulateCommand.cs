using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.Json;
using Distributed.Cli.Run;
using Distributed.Cli.Simulate;

namespace Distributed.Cli.Commands;

/// <summary>
/// <c>dsattn simulate</c>: projects one layer's forward+backward time per scheme on a cluster from an
/// alpha-beta model of its collectives and the kernels' achieved throughput. Runs no benchmark.
/// </summary>
internal static class SimulateCommand
{
    public static Command Create()
    {
        var ranks = new Option<int>("--ranks") { Description = "P, the GPUs (ranks) of the sequence-parallel group.", Required = true };
        var seq = new Option<long>("--seq") { Description = "N, global tokens; K and M suffixes allowed (2048K = 2,097,152).", Required = true, CustomParser = r =>
        {
            try { return ParseTokens(r.Tokens.Single().Value); }
            catch (ArgumentException e) { r.AddError(e.Message); return 0; }
        } };
        var json = new Option<string?>("--json") { Description = "Write a JSON array, one object per scheme (scheme, attention, computeMs, commMs, totalMs, stepMs, bytesSent, bytesReceived, …), atomically." };
        var hardware = new Option<string?>("--hardware") { Description = "A preset JSON file: name, gpusPerNode, intraLatencyUs, intraBandwidthGBs, interLatencyUs, interBandwidthGBs, flashTflops, lightningTflops, elementBytes. Default: an A100-class cluster (printed)." };
        var kernels = new Option<string?>("--kernels") { Description = "Kernel rates from a `dsattn bench kernels --json` file (overrides the preset's TFLOP/s)." };
        var tflops = new Option<double?>("--kernel-tflops") { Description = "Achieved (not peak) kernel TFLOP/s for both kinds (overrides the preset's)." };
        var attention = new Option<string>("--attention") { Description = "lightning (lasp2, lasp1, ulysses, hybrid as linear attention; ring as the papers' quadratic blockwise baseline) or softmax (ulysses, hybrid, ring softmax). allgather and partial are always softmax.", DefaultValueFactory = _ => "lightning" };
        attention.AcceptOnlyFromAmong("lightning", "softmax");
        var batch = new Option<int>("--batch") { Description = "B.", DefaultValueFactory = _ => 1 };
        var heads = new Option<int>("--heads") { Description = "H, query heads.", DefaultValueFactory = _ => 32 };
        var kvHeads = new Option<int>("--kv-heads") { Description = "Hk, key/value heads.", DefaultValueFactory = _ => 8 };
        var headDim = new Option<int>("--head-dim") { Description = "D.", DefaultValueFactory = _ => 64 };
        var valueDim = new Option<int>("--value-dim") { Description = "Dv.", DefaultValueFactory = _ => 64 };
        var layers = new Option<int>("--layers") { Description = "Attention layers per step (stepMs = layers × totalMs).", DefaultValueFactory = _ => 16 };
        var noCausal = new Option<bool>("--no-causal") { Description = "Bidirectional attention (default causal)." };
        var denseParams = new Option<double>("--dense-params") { Description = "Parameters of the model's dense matmuls (projections, MLPs, head), e.g. 1.2e9 for Linear-Llama3-1B: adds 6·params·B·N/P FLOPs per step at the flash forward rate to stepMs (the same for every scheme), so step ratios compare with whole-model throughput. Default 0: attention only.", DefaultValueFactory = _ => 0 };
        var noDecay = new Option<bool>("--no-decay") { Description = "Lightning without decay (it does not change the cost; printed for the record)." };
        var command = new Command("simulate", "Project one layer's forward+backward time per scheme on a GPU cluster (alpha-beta model per collective, kernel throughput from a preset, --kernel-tflops or a `bench kernels` JSON). Defaults: an A100-class cluster and a Linear-Llama3-1B-like shape.")
        {
            ranks, seq, json, hardware, kernels, tflops, attention, batch, heads, kvHeads, headDim, valueDim, layers, noCausal, noDecay, denseParams,
        };
        command.SetAction(parse =>
        {
            try
            {
                int p = parse.GetValue(ranks);
                if (p < 1) throw new ArgumentException($"--ranks must be at least 1 (got {p}).", "ranks");
                var shape = new SimulatedShape(parse.GetValue(batch), parse.GetValue(seq), parse.GetValue(heads), parse.GetValue(kvHeads),
                    parse.GetValue(headDim), parse.GetValue(valueDim), parse.GetValue(layers), !parse.GetValue(noCausal), !parse.GetValue(noDecay));
                if (shape.Batch < 1 || shape.Heads < 1 || shape.KvHeads < 1 || shape.HeadDim < 1 || shape.ValueDim < 1 || shape.Layers < 1)
                    throw new ArgumentException("--batch, --heads, --kv-heads, --head-dim, --value-dim and --layers must be at least 1.", "shape");
                if (shape.Heads % shape.KvHeads != 0) throw new ArgumentException($"--heads {shape.Heads} is not a multiple of --kv-heads {shape.KvHeads}.", "kv-heads");
                if (shape.SeqLen < p) throw new ArgumentException($"--seq {shape.SeqLen} is shorter than --ranks {p}; give at least one token per rank.", "seq");
                var preset = parse.GetValue(hardware) is { } hw ? ClusterPreset.Load(hw) : ClusterPreset.A100;
                if (parse.GetValue(tflops) is { } t)
                {
                    if (!(t > 0)) throw new ArgumentException($"--kernel-tflops must be positive (got {t}).", "kernel-tflops");
                    preset = preset with { FlashTflops = t, LightningTflops = t };
                }
                var rates = parse.GetValue(kernels) is { } k ? MeasuredKernelRates.Load(k, shape.Causal) : KernelRates.FromPreset(preset);
                string kind = parse.GetValue(attention)!;
                double dense = parse.GetValue(denseParams);
                if (!(dense >= 0)) throw new ArgumentException($"--dense-params must be 0 or more (got {dense}).", "dense-params");
                double denseMs = 6 * dense * shape.Batch * ((double)shape.SeqLen / p) / rates.FlashForward * 1e3;
                var estimates = Simulate(preset, rates, shape, p, kind);
                Console.Write(Describe(preset, rates, shape, p, kind, estimates, dense, denseMs));
                if (parse.GetValue(json) is { } path) WriteJson(path, preset, rates, shape, p, estimates, denseMs);
                return 0;
            }
            catch (ArgumentException e)
            {
                Console.Error.WriteLine($"dsattn simulate: {e.Message}");
                return 2;
            }
        });
        return command;
    }

    /// <summary>Every scheme's estimate for one configuration.</summary>
    internal static List<SchemeEstimate> Simulate(ClusterPreset preset, KernelRates rates, SimulatedShape shape, int ranks, string attention)
    {
        var model = new SchemeCostModel(preset, rates, shape, ranks);
        var rows = attention == "lightning" ? SchemeCostModel.Schemes.Concat(SchemeCostModel.PaperRows) : SchemeCostModel.Schemes;
        return rows.Select(s => model.Estimate(s, attention)).ToList();
    }

    internal static long ParseTokens(string text)
    {
        string t = text.Trim();
        long unit = t.EndsWith('K') || t.EndsWith('k') ? 1024 : t.EndsWith('M') || t.EndsWith('m') ? 1024 * 1024 : 1;
        if (unit > 1) t = t[..^1];
        if (!long.TryParse(t, NumberStyles.None, CultureInfo.InvariantCulture, out long v) || v < 1)
            throw new ArgumentException($"--seq must be a positive token count such as 65536, 512K or 2M (got '{text}').", "seq");
        return v * unit;
    }

    private static string Describe(ClusterPreset h, KernelRates r, SimulatedShape s, int p, string kind, List<SchemeEstimate> e, double dense, double denseMs)
    {
        var text = new StringBuilder();
        text.AppendLine(FormattableString.Invariant($"hardware: {h.Name}: {h.GpusPerNode} GPUs/node; intra-node α {h.IntraLatencyUs} µs, β {h.IntraBandwidthGBs} GB/s; inter-node α {h.InterLatencyUs} µs, β {h.InterBandwidthGBs} GB/s; {h.ElementBytes} bytes/element"));
        text.AppendLine($"kernels: {r.Source}");
        text.AppendLine(FormattableString.Invariant($"shape: B={s.Batch} N={s.SeqLen} H={s.Heads} Hk={s.KvHeads} D={s.HeadDim} Dv={s.ValueDim}, {s.Layers} layers, {(s.Causal ? "causal" : "non-causal")}, decay {(s.Decay ? "on" : "off")}; P={p} ({(p + h.GpusPerNode - 1) / h.GpusPerNode} node(s)); attention {kind}"));
        text.AppendLine(FormattableString.Invariant($"one layer, forward + backward, per rank; step = {s.Layers} layers{(dense > 0 ? $" + {denseMs:F1} ms of dense matmuls ({dense:G3} parameters)" : " (attention only)")}:"));
        text.AppendLine(FormattableString.Invariant($"{"scheme",-12} {"attention",-9} {"compute ms",11} {"comm ms",10} {"total ms",10} {"step ms",11} {"sent",10} {"received",10}"));
        foreach (var x in e)
            text.AppendLine(x.Feasible
                ? FormattableString.Invariant($"{x.Scheme,-12} {x.Attention,-9} {x.ComputeMs,11:F2} {x.CommMs,10:F2} {x.TotalMs,10:F2} {x.TotalMs * s.Layers + denseMs,11:F1} {RunSummary.Bytes(x.BytesSent),10} {RunSummary.Bytes(x.BytesReceived),10}")
                : $"{x.Scheme,-12} {x.Attention,-9} {"-",11} {"-",10} {"-",10} {"-",11} {"-",10} {"-",10}");
        foreach (var x in e) text.AppendLine($"  {x.Scheme}: {x.Note}");
        double Step(SchemeEstimate x) => x.TotalMs * s.Layers + denseMs;
        SchemeEstimate? Row(string name) => e.FirstOrDefault(x => x.Scheme == name && x.Feasible);
        foreach (var (mine, other) in new[] { ("lasp2", "lasp1"), ("lasp2", "ring"), ("lasp2-paper", "lasp1-paper"), ("lasp2-paper", "ring"), ("lasp2-paper", "ring-linear") })
            if (Row(mine) is { } a && Row(other) is { } b)
                text.AppendLine(FormattableString.Invariant($"{mine} vs {other}{(other == "ring" && b.Attention == "lightning" ? " (quadratic blockwise)" : "")}: step time ratio {Step(b) / Step(a):F3} ({mine} throughput {Signed((Step(b) / Step(a) - 1) * 100)}%)"));
        return text.ToString();
    }

    private static string Signed(double percent)
    {
        double r = Math.Round(percent, 1);
        return (r >= 0 ? "+" : "") + (r == 0 ? 0.0 : r).ToString("F1", CultureInfo.InvariantCulture);
    }

    private static void WriteJson(string target, ClusterPreset h, KernelRates r, SimulatedShape s, int p, List<SchemeEstimate> e, double denseMs)
    {
        string path = Path.GetFullPath(target);
        if (Path.GetDirectoryName(path) is { } dir && !Directory.Exists(dir))
            throw new ArgumentException($"--json: the folder '{dir}' does not exist; create it or write elsewhere.", "json");
        var doc = e.Select(x => new
        {
            scheme = x.Scheme, attention = x.Attention, causal = s.Causal, decay = s.Decay, ranks = p,
            b = s.Batch, n = s.SeqLen, h = s.Heads, hk = s.KvHeads, d = s.HeadDim, dv = s.ValueDim, layers = s.Layers,
            feasible = x.Feasible, computeMs = x.ComputeMs, commMs = x.CommMs, totalMs = x.TotalMs, denseMs, stepMs = x.TotalMs * s.Layers + denseMs,
            bytesSent = x.BytesSent, bytesReceived = x.BytesReceived, note = x.Note,
            hardware = h, kernels = new { flashForwardGflops = r.FlashForward / 1e9, flashBackwardGflops = r.FlashBackward / 1e9, lightningForwardGflops = r.LightningForward / 1e9, lightningBackwardGflops = r.LightningBackward / 1e9, source = r.Source },
        });
        string tmp = Path.Combine(Path.GetDirectoryName(path)!, $".{Path.GetFileName(path)}.tmp-{Environment.ProcessId.ToString(CultureInfo.InvariantCulture)}");
        try
        {
            File.WriteAllText(tmp, JsonSerializer.Serialize(doc, new JsonSerializerOptions { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.CamelCase }));
            File.Move(tmp, path, overwrite: true);
        }
        finally { File.Delete(tmp); }
    }
}
