using System.Diagnostics;
using System.Text;
using Distributed.Cluster;
using Xunit;
using Xunit.Abstractions;

namespace Distributed.Cluster.Tests;

/// <summary>
/// Fuzzes the hostfile parser for a bounded time: random lines from a grammar of both forms (MPICH host:slots,
/// Open MPI host slots=N), hostile slot counts, comments, separators and control characters, then mutated. Every
/// parse must end in a hostfile or a <see cref="HostfileFormatException"/> naming a line that exists; a parsed
/// hostfile's total and hydra text must be computable, and the hydra text must parse back to the same hosts.
/// The seed and the failing text are printed so a failure can be replayed.
/// </summary>
public sealed class HostfileFuzzTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Budget = TimeSpan.FromSeconds(double.TryParse(Environment.GetEnvironmentVariable("DSATTN_FUZZ_SECONDS"), out double s) ? s : 3);

    [Fact]
    public void ParseText_RandomAndMutated_OnlyDocumentedErrors()
    {
        int seed = Environment.TickCount;
        var rng = new Random(seed);
        long executions = 0, parsed = 0, refused = 0;
        double slowestMs = 0;
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < Budget)
        {
            string text = rng.Next(4) == 0 ? Mutate(Grammar(rng), rng) : Grammar(rng);
            var one = Stopwatch.StartNew();
            try
            {
                var h = Hostfile.ParseText(text, "fuzz.txt");
                Assert.NotEmpty(h.Entries);
                Assert.True(h.TotalSlots >= h.Entries.Count, $"seed {seed}: total {h.TotalSlots} < {h.Entries.Count} hosts");
                var back = Hostfile.ParseText(h.ToHydraText(), "hydra.txt");
                Assert.Equal(h.Entries.Select(e => (e.Host, e.Slots)), back.Entries.Select(e => (e.Host, e.Slots)));
                parsed++;
            }
            catch (HostfileFormatException e)
            {
                refused++;
                int lines = text.Split('\n').Length;
                Assert.True(e.Line >= 1 && e.Line <= lines, $"seed {seed}: line {e.Line} of {lines}\n{Escape(text)}");
                Assert.StartsWith($"fuzz.txt:{e.Line}: ", e.Message, StringComparison.Ordinal);
            }
            catch (Exception e) when (e is not Xunit.Sdk.XunitException)
            {
                Assert.Fail($"seed {seed}, execution {executions}: {e.GetType().Name}: {e.Message}\ntext: {Escape(text)}");
            }
            slowestMs = Math.Max(slowestMs, one.Elapsed.TotalMilliseconds);
            executions++;
        }
        output.WriteLine($"seed {seed}: {executions} executions in {clock.Elapsed.TotalSeconds:F1} s ({parsed} parsed, {refused} refused); slowest {slowestMs:F2} ms");
        Assert.True(executions > 1000, $"only {executions} executions");
        Assert.True(parsed > 0 && refused > 0, "the fuzzer must reach both outcomes");
        Assert.True(slowestMs < 1000, $"slowest parse {slowestMs:F0} ms");
    }

    [Fact]
    public void ParseText_SlotsSummingPastInt32_IsRefusedWithTheLine()
    {
        var e = Assert.Throws<HostfileFormatException>(() => Hostfile.ParseText("a:2000000000\nb slots=2000000000\n", "big.txt"));
        Assert.Equal(2, e.Line);
        Assert.Contains("slots", e.Message, StringComparison.Ordinal);
    }

    private static string Grammar(Random rng)
    {
        string Pick(params string[] o) => o[rng.Next(o.Length)];
        string Count() => Pick("1", "2", "16", "0", "-1", "2147483647", "2147483648", "99999999999999999999", "", "x", "٣", "1e3", " 4", "+4");
        string Host() => Pick("node1", "n-2.cluster", "10.0.0.7", "localhost", "", "::1", "[fe80::1]", "a=b", "h\u0000st", "ünïcode", "#", "host:", ":4");
        var lines = new List<string>();
        int n = rng.Next(0, 8);
        for (int i = 0; i < n; i++)
            lines.Add(rng.Next(7) switch
            {
                0 => $"{Host()}:{Count()}",
                1 => $"{Host()} slots={Count()}",
                2 => $"{Host()} slots={Count()} max_slots={Count()}",
                3 => $"{Host()} {Pick("max-slots", "slots", "cpus", "")}={Count()}",
                4 => Pick("", "   ", "# comment", "\t", "\r"),
                5 => $"{Host()}{Pick("", " # trailing", "\r", "\t")}",
                _ => $"{Host()} {Pick("slots", "slots=", "=", "slots==2", "slots=2=3")}",
            });
        return string.Join(Pick("\n", "\r\n", "\n\n"), lines);
    }

    private const string Syntax = ":= #\n\r\t0123456789";

    private static string Mutate(string text, Random rng)
    {
        var sb = new StringBuilder(text);
        for (int e = rng.Next(1, 4); e > 0; e--)
        {
            int at = sb.Length == 0 ? 0 : rng.Next(sb.Length);
            switch (rng.Next(3))
            {
                case 0: sb.Insert(at, (char)rng.Next(0, 0x3000)); break;
                case 1 when sb.Length > 0: sb.Remove(at, 1); break;
                default: sb.Insert(at, Syntax[rng.Next(Syntax.Length)]); break;
            }
        }
        return sb.ToString();
    }

    private static string Escape(string s) => string.Concat(s.Select(c => c < 32 || c > 126 ? $"\\u{(int)c:x4}" : c.ToString()));
}
