using System.Globalization;
using System.Text;
using System.Text.Json;

namespace Distributed.Cli.Scaling;

/// <summary>The sweep's results as JSON (one object per case) and CSV (one line per case, rank and phase), written atomically.</summary>
internal static class ScalingReport
{
    public const string JsonName = "scaling.json", CsvName = "scaling.csv";

    public static void WriteJson(string dir, IReadOnlyList<CaseResult> results, string environment, IReadOnlyDictionary<CaseResult, double> model)
    {
        var doc = new
        {
            environment,
            cases = results.Select(c => new
            {
                attention = c.AttentionName, scheme = c.SchemeName, causal = true, layout = c.Layout, ranks = c.Ranks,
                b = c.Shape.Batch, n = c.Shape.SeqLen, h = c.Shape.Heads, hk = c.Shape.KvHeads, d = c.Shape.HeadDim, dv = c.Shape.ValueDim,
                flopsPerStep = c.Flops, stepMs = c.StepMs, modelMs = model.TryGetValue(c, out double m) ? m : (double?)null,
                perRank = c.PerRank.Select(r => new
                {
                    rank = r.Rank, tokens = r.Tokens, peakResidentBytes = r.PeakBytes,
                    forward = Phase(r.Forward), backward = Phase(r.Backward),
                }),
            }),
        };
        Atomic(Path.Combine(dir, JsonName), JsonSerializer.Serialize(doc, new JsonSerializerOptions { WriteIndented = true }));

        static object Phase(PhaseFigures f) => new { wallMs = f.WallMs, computeMs = f.ComputeMs, commMs = f.CommMs, waitMs = f.WaitMs, bytesSent = f.BytesSent, bytesReceived = f.BytesReceived };
    }

    public static void WriteCsv(string dir, IReadOnlyList<CaseResult> results)
    {
        var text = new StringBuilder("attention,scheme,ranks,n,b,h,hk,d,dv,layout,rank,phase,wall_ms,compute_ms,comm_ms,wait_ms,bytes_sent,bytes_received,peak_resident_bytes\n");
        foreach (var c in results)
            foreach (var r in c.PerRank)
                foreach (var (name, f) in new[] { ("forward", r.Forward), ("backward", r.Backward) })
                    text.AppendLine(string.Join(',', c.AttentionName, c.SchemeName, I(c.Ranks), I(c.Shape.SeqLen), I(c.Shape.Batch), I(c.Shape.Heads), I(c.Shape.KvHeads),
                        I(c.Shape.HeadDim), I(c.Shape.ValueDim), c.Layout, I(r.Rank), name, D(f.WallMs), D(f.ComputeMs), D(f.CommMs), D(f.WaitMs), D(f.BytesSent), D(f.BytesReceived), D(r.PeakBytes)));
        Atomic(Path.Combine(dir, CsvName), text.ToString());

        static string I(int x) => x.ToString(CultureInfo.InvariantCulture);
        static string D(double x) => x.ToString("R", CultureInfo.InvariantCulture);
    }

    /// <summary>Writes through a temporary file beside the target, then renames it.</summary>
    internal static void Atomic(string path, string text)
    {
        string tmp = Path.Combine(Path.GetDirectoryName(path)!, $".{Path.GetFileName(path)}.tmp-{Environment.ProcessId.ToString(CultureInfo.InvariantCulture)}");
        try
        {
            File.WriteAllText(tmp, text);
            File.Move(tmp, path, overwrite: true);
        }
        finally { File.Delete(tmp); }
    }
}
