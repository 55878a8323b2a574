using System.Globalization;
using System.Text;
using System.Text.Json;

namespace Distributed.Cli.Run;

/// <summary>
/// The end-of-job report on rank 0: two plain tables of at most 80 columns (so CI logs and narrow
/// terminals read them whole), the check lines, and the same figures as JSON.
/// </summary>
internal static class RunSummary
{
    public static void Print(JobResult r, RunSettings s, bool inProcess)
    {
        var text = new StringBuilder();
        text.AppendLine(FormattableString.Invariant($"{RunExecution.Describe(r.Spec, r.Shape)}, {r.Layout} sharding, {s.Iterations} step(s){(s.Warmup > 0 ? $" after {s.Warmup} warm-up step(s)" : "")}, per step:"));
        text.AppendLine(FormattableString.Invariant($"{"rank",4} {"tokens",10} {"fwd ms",10} {"bwd ms",10} {"compute ms",10} {"comm ms",10} {"GFLOP/s",9}"));
        foreach (var m in r.Ranks)
            text.AppendLine(FormattableString.Invariant($"{m.Rank,4} {m.LocalTokens,10} {m.ForwardMs,10:F1} {(s.Backward ? m.BackwardMs.ToString("F1", CultureInfo.InvariantCulture) : "-"),10} {m.ComputeMs,10:F1} {m.CommunicationMs,10:F1} {m.Gflops(r.Flops, r.Ranks.Count),9:F1}"));
        text.AppendLine(FormattableString.Invariant($"{"rank",4} {"sent/step",12} {"received/step",14} {(inProcess ? "peak RSS (process)" : "peak RSS (rank)"),20} {"alloc/step",11}"));
        foreach (var m in r.Ranks)
            text.AppendLine(FormattableString.Invariant($"{m.Rank,4} {Bytes(m.BytesSentPerStep),12} {Bytes(m.BytesReceivedPerStep),14} {Bytes(m.PeakBytes),20} {(double.IsNaN(m.AllocatedBytesPerStep) ? "-" : Bytes(m.AllocatedBytesPerStep)),11}"));
        if (s.Iterations > 1 || s.Warmup > 0)
        {
            string steps = s.Warmup > 0 ? "per timed step" : "per step after the first";
            text.AppendLine(inProcess
                ? FormattableString.Invariant($"alloc/step: managed bytes allocated {steps}, the process's total / {r.Ranks.Count} ranks")
                : $"alloc/step: managed bytes each rank's process allocated {steps}");
        }
        if (s.Link is not null)
        {
            // The emulated link: how long each rank's collectives were in flight and how much of that it waited.
            text.AppendLine(FormattableString.Invariant($"emulated link {s.Link.BytesPerSecond / 1e9:G4} GB/s, latency {s.Link.Latency.TotalMicroseconds:G4} us; overlap {(s.Overlap ? "on" : "off")}"));
            text.AppendLine(FormattableString.Invariant($"{"rank",4} {"link comm ms",12} {"waited ms",10} {"hidden ms",10} {"hidden",7}"));
            foreach (var m in r.Ranks)
                text.AppendLine(FormattableString.Invariant($"{m.Rank,4} {m.LinkCommunicationMs,12:F1} {m.LinkWaitedMs,10:F1} {Math.Max(0, m.LinkCommunicationMs - m.LinkWaitedMs),10:F1} {100 * m.HiddenFraction,6:F0}%"));
            text.AppendLine(FormattableString.Invariant($"communication hidden: {100 * r.Ranks.Min(m => m.HiddenFraction):F0}%"));
        }
        Console.Write(text.ToString());
        if (r.CheckSkippedReason is not null) Console.WriteLine($"check skipped: {r.CheckSkippedReason}");
        foreach (var c in r.Checks)
            Console.WriteLine(FormattableString.Invariant($"check {c.Tensor}: max |error| {c.MaxAbsError:E2} over max |ref| {c.MaxAbsReference:E2} = relative {c.RelativeError:E2} ({c.Compared} values{(c.NonFinite > 0 ? $", {c.NonFinite} NaN/Inf" : "")}; tolerance {s.Tolerance:E0}) {(c.Passed ? "ok" : "FAILED")}"));
        if (r.CheckMode != CheckMode.None && r.NonFiniteOutputs.Count == 0)
            Console.WriteLine("check finite outputs: every element of every output is finite ok");
        foreach (string line in r.NonFiniteOutputs)
            Console.WriteLine($"check finite outputs: {line} FAILED");
    }

    /// <summary>The most managed bytes any rank allocated per step after the first; null with one step.</summary>
    internal static double? AllocatedPerStep(JobResult r) =>
        r.Ranks.Count == 0 || r.Ranks.Any(m => double.IsNaN(m.AllocatedBytesPerStep)) ? null : r.Ranks.Max(m => m.AllocatedBytesPerStep);

    internal static string Bytes(double b) =>
        b >= 1L << 40 ? FormattableString.Invariant($"{b / (1L << 40):F1} TiB")
        : b >= 1L << 30 ? FormattableString.Invariant($"{b / (1L << 30):F2} GiB")
        : b >= 1 << 20 ? FormattableString.Invariant($"{b / (1 << 20):F1} MiB")
        : b >= 1 << 10 ? FormattableString.Invariant($"{b / 1024:F1} KiB")
        : FormattableString.Invariant($"{b:F0} B");

    /// <summary>Writes the results as JSON, atomically (a temporary file beside the target, then a rename).</summary>
    public static void WriteJson(string target, List<JobResult> results, RunSettings s, IReadOnlyList<string>? outputs, bool committed)
    {
        var doc = results.Select(r => new
        {
            attention = r.Spec.Attention.ToString().ToLowerInvariant(),
            scheme = SchemeRegistry.Describe(r.Spec.Scheme).Name,
            causal = r.Spec.Causal,
            decay = r.Spec.DecaySpec,
            layout = r.Layout,
            b = r.Shape.Batch, n = r.Shape.SeqLen, h = r.Shape.Heads, hk = r.Shape.KvHeads, d = r.Shape.HeadDim, dv = r.Shape.ValueDim,
            backward = s.Backward,
            iterations = s.Iterations,
            warmup = s.Warmup,
            flopsPerStep = r.Flops,
            allocatedBytesPerStep = AllocatedPerStep(r),
            wallMs = r.TotalMs,
            ranks = r.Ranks.Select(m => new
            {
                rank = m.Rank, tokens = m.LocalTokens, forwardMs = m.ForwardMs, backwardMs = m.BackwardMs, computeMs = m.ComputeMs,
                commMs = m.CommunicationMs, gflops = m.Gflops(r.Flops, r.Ranks.Count), bytesSent = m.BytesSentPerStep,
                bytesReceived = m.BytesReceivedPerStep, peakResidentBytes = m.PeakBytes,
                linkCommMs = s.Link is null ? (double?)null : m.LinkCommunicationMs,
                linkWaitedMs = s.Link is null ? (double?)null : m.LinkWaitedMs,
                hiddenFraction = s.Link is null ? (double?)null : m.HiddenFraction,
                allocatedBytesPerStep = double.IsNaN(m.AllocatedBytesPerStep) ? (double?)null : m.AllocatedBytesPerStep,
            }),
            overlap = s.Overlap,
            link = s.Link is null ? null : new { gigabytesPerSecond = s.Link.BytesPerSecond / 1e9, latencyUs = s.Link.Latency.TotalMicroseconds },
            communicationHidden = s.Link is null ? (double?)null : r.Ranks.Min(m => m.HiddenFraction),
            check = r.CheckMode.ToString().ToLowerInvariant(),
            checks = r.Checks.Select(c => new { tensor = c.Tensor, maxAbsError = c.MaxAbsError, maxAbsReference = c.MaxAbsReference, relativeError = c.RelativeError, compared = c.Compared, nonFinite = c.NonFinite, passed = c.Passed }),
            checkSkipped = r.CheckSkippedReason,
            outputs = committed ? outputs : null,
        });
        string path = Path.GetFullPath(target);
        string tmp = Path.Combine(Path.GetDirectoryName(path)!, $".{Path.GetFileName(path)}.tmp-{Environment.ProcessId.ToString(CultureInfo.InvariantCulture)}");
        try
        {
            File.WriteAllText(tmp, JsonSerializer.Serialize(doc, new JsonSerializerOptions { WriteIndented = true, NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals }));
            File.Move(tmp, path, overwrite: true);
        }
        finally { File.Delete(tmp); }
    }
}
