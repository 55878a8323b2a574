using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

// The libtorch peer of `dsattn bench kernels --peer libtorch`: one JSON object per line on stdout,
// {"op", "causal", "b", "h", "n", "d", "ms", "gflops"}, the best of ITERATIONS timed runs after one warm-up.
// Usage: Distributed.Benchmarks.Torch B H N D [ITERATIONS]
if (args.Length is < 4 or > 5 || !args.All(a => int.TryParse(a, NumberStyles.None, CultureInfo.InvariantCulture, out int x) && x > 0))
{
    Console.Error.WriteLine("usage: Distributed.Benchmarks.Torch B H N D [ITERATIONS]  (positive integers), e.g. 1 8 4096 64 3");
    return 2;
}
int[] v = [.. args.Select(a => int.Parse(a, CultureInfo.InvariantCulture))];
int b = v[0], h = v[1], n = v[2], d = v[3], iterations = v.Length > 4 ? v[4] : 3;
torch.random.manual_seed(0);

static double Best(Action f, int iterations)
{
    f(); // warm-up
    double best = double.MaxValue;
    for (int i = 0; i < iterations; i++)
    {
        var sw = Stopwatch.StartNew();
        f();
        best = Math.Min(best, sw.Elapsed.TotalMilliseconds);
    }
    return best;
}

void Emit(string op, bool causal, int bb, int hh, int nn, int dd, double ms, double flop) =>
    Console.WriteLine(JsonSerializer.Serialize(new { op, causal, b = bb, h = hh, n = nn, d = dd, ms, gflops = flop / (ms * 1e6), threads = torch.get_num_threads() }));

{
    const int N = 2048;
    using var x = torch.randn(N, N, dtype: float32);
    using var y = torch.randn(N, N, dtype: float32);
    double ms = Best(() => { using var scope = NewDisposeScope(); _ = torch.matmul(x, y); }, iterations);
    Emit("libtorch-gemm-2048", false, 1, 1, N, N, ms, 2.0 * N * N * (double)N);
}
{
    // SDPA takes [B, H, N, D]; the FLOPs are counted as ours are: 4·B·H·N²·D, half when causal.
    using var q = torch.randn(b, h, n, d, dtype: float32);
    using var k = torch.randn(b, h, n, d, dtype: float32);
    using var w = torch.randn(b, h, n, d, dtype: float32);
    foreach (bool causal in new[] { false, true })
    {
        double ms = Best(() => { using var scope = NewDisposeScope(); _ = torch.nn.functional.scaled_dot_product_attention(q, k, w, is_casual: causal); }, iterations);
        Emit("libtorch-sdpa", causal, b, h, n, d, ms, 4.0 * b * h * (double)n * n * d * (causal ? 0.5 : 1.0));
    }
}
return 0;
