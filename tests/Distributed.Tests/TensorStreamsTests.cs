using Distributed.Cli.Run;
using Distributed.IO;
using Distributed.Kernels.Cpu;
using Xunit;

namespace Distributed.Tests;

/// <summary>
/// The CLI's row streaming at offsets past 32 bits: a rank's rows at the end of a global tensor of
/// 4.8·10^9 elements (19.2 GB, a sparse file, so no disk is used) go out and come back through
/// <see cref="TensorStreams"/> and <see cref="NpyTokenRows"/>, in pieces smaller than the shard.
/// </summary>
public sealed class TensorStreamsTests
{
    [Fact]
    public void StoreThenLoad_RowsPast2To32Bytes_LandAtTheirOffsets()
    {
        const long N = 600_000_000;
        const int H = 2, D = 4, W = H * D;
        string path = Path.Combine(Path.GetTempPath(), $"dsattn-sparse-{Guid.NewGuid():N}.npy");
        try
        {
            using var backend = new CpuBackend(1);
            // Zigzag-like: two ranges, one at the end of the sequence, one before it.
            IReadOnlyList<(int Start, int Count)> ranges = [((int)(N - 3), 3), ((int)(N - 700_000), 5)];
            using var local = backend.Allocate(1, 8, H, D);
            var values = Enumerable.Range(0, 8 * W).Select(i => i + 0.5f).ToArray();
            local.CopyFromHost(values);
            using (var writer = NpyWriter.Create(path, [1, N, H, D]))
                new TensorStreams().Store(local, ranges, 1, N, W, writer);

            using (var raw = File.OpenRead(path))
            {
                long dataOffset;
                using (var reader = NpyReader.Open(path)) dataOffset = reader.Header.DataOffset;
                long offset = dataOffset + (N - 3) * W * sizeof(float);
                Assert.True(offset > 1L << 32);
                raw.Seek(offset, SeekOrigin.Begin);
                var bytes = new byte[W * sizeof(float)];
                raw.ReadExactly(bytes);
                Assert.Equal(values.AsSpan(0, W).ToArray(), System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(bytes).ToArray());
            }

            using var rows = new NpyTokenRows(path);
            Assert.Equal(N, rows.SeqLen);
            using var back = backend.Allocate(1, 8, H, D);
            new TensorStreams().Load(rows, ranges, back);
            var got = new float[back.Length];
            back.CopyToHost(got);
            Assert.Equal(values, got);
        }
        finally { File.Delete(path); }
    }
}
