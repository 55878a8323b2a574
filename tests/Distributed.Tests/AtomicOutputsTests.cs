using Distributed.IO;
using Xunit;

namespace Distributed.Tests;

/// <summary>
/// AtomicOutputs: temporaries named after the job beside each target, Commit renames them onto the targets,
/// Abort deletes them without touching existing targets, Prepare clears other jobs' stale temporaries and
/// refuses missing or unwritable folders with a message naming the option, the path and the fix.
/// </summary>
public sealed class AtomicOutputsTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("atomictests-").FullName;

    public void Dispose()
    {
        if (!OperatingSystem.IsWindows())
            File.SetUnixFileMode(_dir, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        Directory.Delete(_dir, recursive: true);
    }

    private string PathOf(string name) => Path.Combine(_dir, name);

    [Fact]
    public void TempPath_IsHiddenBesideTargetAndNamesTheJob()
    {
        var outputs = new AtomicOutputs([PathOf("O.npy")], "job42");
        Assert.Equal(PathOf(".O.npy.dsattn-job42.tmp"), outputs.TempPath(PathOf("O.npy")));
        Assert.Throws<ArgumentException>(() => outputs.TempPath(PathOf("other.npy")));
        Assert.Matches("^[0-9a-f]{16}$", AtomicOutputs.NewJobId());
    }

    [Theory]
    [InlineData("")]
    [InlineData("a.b")]
    [InlineData("a/b")]
    public void Constructor_BadJobId_Throws(string jobId) =>
        Assert.ThrowsAny<ArgumentException>(() => new AtomicOutputs([PathOf("O.npy")], jobId));

    [Fact]
    public void Constructor_SameTargetTwice_Throws()
    {
        var e = Assert.Throws<ArgumentException>(() => new AtomicOutputs([PathOf("O.npy"), PathOf("./O.npy")], "j", ["--out", "--lse-out"]));
        Assert.Contains("--lse-out", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Commit_RenamesEveryTempOntoItsTarget()
    {
        string o = PathOf("O.npy"), lse = PathOf("LSE.npy");
        File.WriteAllBytes(o, [9, 9, 9]); // an older output is replaced
        var outputs = new AtomicOutputs([o, lse], "jobA");
        outputs.Prepare();
        File.WriteAllBytes(outputs.TempPath(o), [1, 2, 3, 4]);
        File.WriteAllBytes(outputs.TempPath(lse), [5, 6]);

        outputs.Commit();

        Assert.Equal([1, 2, 3, 4], File.ReadAllBytes(o));
        Assert.Equal([5, 6], File.ReadAllBytes(lse));
        Assert.False(File.Exists(outputs.TempPath(o)));
        Assert.False(File.Exists(outputs.TempPath(lse)));
        Assert.Equal(["LSE.npy", "O.npy"], Directory.GetFiles(_dir).Select(Path.GetFileName).Order(StringComparer.Ordinal));
    }

    [Fact]
    public void Abort_DeletesTempsAndLeavesExistingTargetUntouched()
    {
        string o = PathOf("O.npy"), lse = PathOf("LSE.npy");
        byte[] old = [7, 7, 7, 7, 7];
        File.WriteAllBytes(o, old);
        var outputs = new AtomicOutputs([o, lse], "jobB");
        outputs.Prepare();
        File.WriteAllBytes(outputs.TempPath(o), [1, 2]); // LSE's temporary was never created

        outputs.Abort();

        Assert.Equal(old, File.ReadAllBytes(o));
        Assert.False(File.Exists(lse));
        Assert.Equal(["O.npy"], Directory.GetFiles(_dir).Select(Path.GetFileName));
        outputs.Abort(); // twice is fine
    }

    [Fact]
    public void Prepare_RemovesOtherJobsStaleTempsOnly()
    {
        string o = PathOf("O.npy");
        var outputs = new AtomicOutputs([o], "current");
        string[] stale = [PathOf(".O.npy.dsattn-oldjob.tmp"), PathOf(".O.npy.dsattn-0123abcd.tmp")];
        string[] kept =
        [
            outputs.TempPath(o),                      // this job's own
            PathOf(".O.npy.dsattn-b.dsattn-x.tmp"),   // a temporary of the target "O.npy.dsattn-b"
            PathOf(".P.npy.dsattn-oldjob.tmp"),       // another target's
            PathOf("O.npy.dsattn-oldjob.tmp"),        // not hidden: not ours
        ];
        foreach (string f in stale.Concat(kept))
            File.WriteAllBytes(f, [1]);

        outputs.Prepare();

        Assert.All(stale, f => Assert.False(File.Exists(f), f));
        Assert.All(kept, f => Assert.True(File.Exists(f), f));
        Assert.DoesNotContain(Directory.GetFiles(_dir), f => Path.GetFileName(f).StartsWith(".dsattn-probe", StringComparison.Ordinal));
    }

    [Fact]
    public void Prepare_MissingFolder_NamesOptionFolderAndFix()
    {
        string target = PathOf("no/such/O.npy");
        var outputs = new AtomicOutputs([target], "j", ["--out"]);
        var e = Assert.Throws<IOException>(outputs.Prepare);
        Assert.Contains($"--out {target}", e.Message, StringComparison.Ordinal);
        Assert.Contains($"the folder {PathOf("no/such")} does not exist", e.Message, StringComparison.Ordinal);
        Assert.Contains("create it", e.Message, StringComparison.Ordinal);
        Assert.Throws<IOException>(() => AtomicOutputs.CheckWritable([target]));
    }

    [Fact]
    public void Prepare_TargetIsAFolder_Refused()
    {
        Directory.CreateDirectory(PathOf("O.npy"));
        var e = Assert.Throws<IOException>(new AtomicOutputs([PathOf("O.npy")], "j", ["--out"]).Prepare);
        Assert.Contains("is a folder", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Prepare_UnwritableFolder_NamesOptionFolderAndFix()
    {
        if (OperatingSystem.IsWindows())
            return; // Unix permissions and /proc; the runtime targets Linux clusters
        string folder = PathOf("ro");
        Directory.CreateDirectory(folder);
        File.SetUnixFileMode(folder, UnixFileMode.UserRead | UnixFileMode.UserExecute);
        if (CanCreateIn(folder)) // root ignores permissions; /proc refuses new files even to root
            folder = "/proc";
        string target = Path.Combine(folder, "O.npy");

        var e = Assert.Throws<IOException>(new AtomicOutputs([target], "j", ["--out"]).Prepare);
        Assert.Contains($"--out {target}", e.Message, StringComparison.Ordinal);
        Assert.Contains($"cannot create files in the folder {folder}", e.Message, StringComparison.Ordinal);
        Assert.Contains("make it writable", e.Message, StringComparison.Ordinal);
        Assert.Throws<IOException>(() => AtomicOutputs.CheckWritable([target], ["--out"]));
    }

    private static bool CanCreateIn(string folder)
    {
        string probe = Path.Combine(folder, "probe");
        try
        {
            File.WriteAllBytes(probe, []);
            File.Delete(probe);
            return true;
        }
        catch (UnauthorizedAccessException)
        {
            return false;
        }
    }

    [Fact]
    public void EndToEnd_TwoRanksWriteTempNpyThenCommit_TargetReadsBack()
    {
        string target = PathOf("O.npy");
        var rank0 = new AtomicOutputs([target], "e2e");
        var rank1 = new AtomicOutputs([target], "e2e");
        rank0.Prepare();
        float[] values = Enumerable.Range(0, 24).Select(i => i * 0.5f).ToArray();
        using (var w0 = NpyWriter.Create(rank0.TempPath(target), [2, 3, 4]))
        {
            // after a barrier, the other rank opens the same temporary
            using var w1 = NpyWriter.Open(rank1.TempPath(target));
            w0.WriteTokenRanges(2, 3, 4, [(0, 1)], [.. values[0..4], .. values[12..16]]);
            w1.WriteTokenRanges(2, 3, 4, [(1, 2)], [.. values[4..12], .. values[16..24]]);
        }
        Assert.False(File.Exists(target));
        rank0.Commit();

        using var r = NpyReader.Open(target);
        var all = new float[24];
        r.Read(0, all);
        Assert.Equal(values, all);
        Assert.Single(Directory.GetFiles(_dir));
    }
}
