using System.Text.Json;

namespace Distributed.Cli.Simulate;

/// <summary>
/// The hardware numbers the simulator uses, all printed with its result. Bandwidths are achieved
/// per-GPU figures (what a collective's bus bandwidth reaches), not link peaks; latencies are per message.
/// </summary>
/// <param name="Name">What the numbers describe.</param>
/// <param name="GpusPerNode">Ranks that share the fast intra-node link; ranks are placed in order, node by node.</param>
/// <param name="IntraLatencyUs">α inside a node, microseconds per message.</param>
/// <param name="IntraBandwidthGBs">β inside a node, GB/s (10^9 bytes) per GPU per direction.</param>
/// <param name="InterLatencyUs">α between nodes, microseconds per message.</param>
/// <param name="InterBandwidthGBs">β between nodes, GB/s per GPU per direction (its NIC).</param>
/// <param name="FlashTflops">Achieved softmax (flash) kernel throughput, TFLOP/s, forward and backward.</param>
/// <param name="LightningTflops">Achieved lightning kernel throughput, TFLOP/s, forward and backward.</param>
/// <param name="ElementBytes">Bytes per element on the wire (2 for bf16 training, 4 for this project's fp32).</param>
internal sealed record ClusterPreset(string Name, int GpusPerNode, double IntraLatencyUs, double IntraBandwidthGBs,
    double InterLatencyUs, double InterBandwidthGBs, double FlashTflops, double LightningTflops, int ElementBytes)
{
    /// <summary>
    /// A DGX-A100-class cluster: 8 GPUs per node on NVLink 3 (600 GB/s bidirectional per GPU; 200 GB/s taken
    /// as the achieved one-way bus bandwidth), one 200 Gb/s HDR InfiniBand NIC per GPU (25 GB/s; 20 GB/s
    /// achieved), bf16 on the wire, and achieved kernel throughputs of 150 TFLOP/s (FlashAttention-2 class, about
    /// half of the 312 TFLOP/s bf16 peak) and 60 TFLOP/s for lightning (chunked linear attention is
    /// memory-bound: its small D×Dv matmuls reach a fraction of the softmax kernel's rate).
    /// </summary>
    public static ClusterPreset A100 { get; } = new("A100-class (DGX A100: NVLink 3 + HDR InfiniBand)", 8, 5, 200, 10, 20, 150, 60, 2);

    /// <summary>Reads a preset from JSON: every property of the record, camelCase, all required.</summary>
    /// <exception cref="ArgumentException">A missing file, bad JSON, or a missing or non-positive number (named).</exception>
    public static ClusterPreset Load(string path)
    {
        if (!File.Exists(path)) throw new ArgumentException($"--hardware: the file '{path}' does not exist; give a JSON file with name, gpusPerNode, intraLatencyUs, intraBandwidthGBs, interLatencyUs, interBandwidthGBs, flashTflops, lightningTflops and elementBytes.", "hardware");
        JsonElement root;
        try { root = JsonDocument.Parse(File.ReadAllText(path)).RootElement; }
        catch (JsonException e) { throw new ArgumentException($"--hardware: '{path}' is not valid JSON: {e.Message}", "hardware", e); }
        double Number(string key)
        {
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty(key, out var v) || v.ValueKind != JsonValueKind.Number || !(v.GetDouble() > 0))
                throw new ArgumentException($"--hardware: '{path}' needs \"{key}\" as a positive number.", "hardware");
            return v.GetDouble();
        }
        string name = root.ValueKind == JsonValueKind.Object && root.TryGetProperty("name", out var n) && n.ValueKind == JsonValueKind.String ? n.GetString()! : Path.GetFileNameWithoutExtension(path);
        return new ClusterPreset(name, (int)Number("gpusPerNode"), Number("intraLatencyUs"), Number("intraBandwidthGBs"), Number("interLatencyUs"),
            Number("interBandwidthGBs"), Number("flashTflops"), Number("lightningTflops"), (int)Number("elementBytes"));
    }

    /// <summary>The link inside a node.</summary>
    [System.Text.Json.Serialization.JsonIgnore]
    public Link Intra => new(IntraLatencyUs * 1e-6, IntraBandwidthGBs * 1e9);

    /// <summary>The link between nodes.</summary>
    [System.Text.Json.Serialization.JsonIgnore]
    public Link Inter => new(InterLatencyUs * 1e-6, InterBandwidthGBs * 1e9);
}

/// <summary>One link of the alpha-beta model: a message of b bytes takes <c>α + b/β</c> seconds.</summary>
/// <param name="AlphaSeconds">α, seconds per message.</param>
/// <param name="BytesPerSecond">β, bytes per second.</param>
internal readonly record struct Link(double AlphaSeconds, double BytesPerSecond)
{
    /// <summary>Seconds for one message of <paramref name="bytes"/>.</summary>
    public double Message(double bytes) => AlphaSeconds + bytes / BytesPerSecond;
}
