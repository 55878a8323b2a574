using System.Globalization;
using System.Text.Json;
using Distributed.Cli.Simulate;

namespace Distributed.Cli.Scaling;

/// <summary>
/// The simulator calibrated to this machine, set beside the measured cases: link α and β from
/// <see cref="LinkProbe"/> (one host: intra = inter, GPUs per node = the world size), 4-byte elements, and
/// kernel rates from a <c>bench kernels</c> JSON or, by default, from the sweep's own P = 1 cases (FLOPs of each
/// direction over its kernel time, per kind, at the largest N). Writes the preset as <c>hardware.json</c> (one rate
/// per kind: forward and backward combined), so <c>dsattn simulate --hardware DIR/hardware.json</c> projects from
/// the same figures.
/// </summary>
internal static class ScalingModel
{
    public const string HardwareName = "hardware.json";

    public static Dictionary<CaseResult, double> Simulate(string dir, List<CaseResult> results, (double AlphaSeconds, double BytesPerSecond) link, int world,
        string? kernelsFile, string environment, out string calibration)
    {
        var model = new Dictionary<CaseResult, double>();
        calibration = "model: no calibration (the link needs 2 ranks or more)";
        if (link.BytesPerSecond <= 0) return model;
        var rates = kernelsFile is not null ? MeasuredKernelRates.Load(kernelsFile, causal: true) : FromSweep(results);
        if (rates is null)
        {
            calibration = "model: no P = 1 case of each kind to calibrate the kernels from; give --kernels FILE";
            return model;
        }
        double alphaUs = link.AlphaSeconds * 1e6, betaGBs = link.BytesPerSecond / 1e9;
        // The preset holds one rate per kind: the forward+backward FLOPs over their time, so that
        // simulate --hardware hardware.json gives the same compute as the model column.
        static double Combined(double forward, double backward, double backwardFactor) => (1 + backwardFactor) / (1 / forward + backwardFactor / backward);
        var preset = new ClusterPreset($"this machine ({environment})", world, alphaUs, betaGBs, alphaUs, betaGBs,
            Combined(rates.FlashForward, rates.FlashBackward, 2.5) / 1e12, Combined(rates.LightningForward, rates.LightningBackward, 2) / 1e12, 4);
        ScalingReport.Atomic(Path.Combine(dir, HardwareName), JsonSerializer.Serialize(preset, new JsonSerializerOptions { WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.CamelCase }));
        foreach (var c in results)
        {
            var shape = new SimulatedShape(c.Shape.Batch, c.Shape.SeqLen, c.Shape.Heads, c.Shape.KvHeads, c.Shape.HeadDim, c.Shape.ValueDim, 1, true, true);
            var e = new SchemeCostModel(preset, rates, shape, c.Ranks).Estimate(c.SchemeName, c.AttentionName);
            if (e.Feasible) model[c] = e.TotalMs;
        }
        calibration = FormattableString.Invariant($"model: link α {alphaUs:F1} µs, β {betaGBs:F2} GB/s (ranks 0↔1); kernels {rates.Source}; preset written to {HardwareName}");
        return model;
    }

    /// <summary>Per kind, from the P = 1 case at the largest N of the first scheme that has one.</summary>
    private static KernelRates? FromSweep(List<CaseResult> results)
    {
        (double Forward, double Backward)? Rate(AttentionKind kind, double backwardFactor)
        {
            var one = results.Where(c => c.Attention == kind && c.Ranks == 1).OrderByDescending(c => c.Shape.SeqLen).FirstOrDefault();
            if (one is null) return null;
            var r = one.PerRank[0];
            double forwardFlops = one.Flops / (1 + backwardFactor);
            return (forwardFlops / (r.Forward.ComputeMs * 1e-3), backwardFactor * forwardFlops / (r.Backward.ComputeMs * 1e-3));
        }
        var flash = Rate(AttentionKind.Softmax, 2.5);
        var lightning = Rate(AttentionKind.Lightning, 2);
        if (flash is null && lightning is null) return null;
        var f = flash ?? lightning!.Value;
        var l = lightning ?? flash!.Value;
        return new KernelRates(f.Forward, f.Backward, l.Forward, l.Backward, FormattableString.Invariant(
            $"calibrated from this sweep's P = 1 cases: flash {f.Forward / 1e9:F2}/{f.Backward / 1e9:F2} GFLOP/s, lightning {l.Forward / 1e9:F2}/{l.Backward / 1e9:F2} GFLOP/s (forward/backward){(flash is null || lightning is null ? "; one kind missing, the other's rates used" : "")}"));
    }
}
