using Xunit;

namespace Distributed.Cluster.Tests;

/// <summary>The up-front check of the MPI library: found, MPI-3, MPICH ABI; otherwise the problem and the fix.</summary>
public sealed class MpichLibraryTests
{
    [Fact]
    public void Probe_InstalledMpich_IsAccepted_WithItsVersion()
    {
        var (problem, library, version) = MpichLibrary.Probe(null);
        Assert.True(problem is null, problem + " (./test.sh installs MPICH: apt-get install -y mpich)");
        Assert.Contains(library, MpichLibrary.DefaultNames);
        Assert.StartsWith("MPICH", version, StringComparison.Ordinal);
    }

    [Fact]
    public void Probe_MissingFile_NamesThePathAndTheFix()
    {
        var (problem, _, _) = MpichLibrary.Probe("/nonexistent/libmpich.so.12");
        Assert.NotNull(problem);
        Assert.Contains("DSATTN_MPI_LIBRARY=/nonexistent/libmpich.so.12 could not be loaded (no such file)", problem, StringComparison.Ordinal);
        Assert.Contains("apt-get install -y mpich", problem, StringComparison.Ordinal);
    }

    [Fact]
    public void Probe_ALibraryThatIsNotMpi_IsRefused()
    {
        var (problem, library, _) = MpichLibrary.Probe("libc.so.6");
        Assert.Equal("libc.so.6", library);
        Assert.NotNull(problem);
        Assert.Contains("libc.so.6 has no MPI_Get_library_version", problem, StringComparison.Ordinal);
        Assert.Contains("apt-get install -y mpich", problem, StringComparison.Ordinal);
    }

    [Theory]
    // The first lines of what each library's MPI_Get_library_version returns.
    [InlineData("MPICH Version:\t4.0.2\nMPICH Release date:\tThu Mar 24 2022\n", true)]
    [InlineData("Intel(R) MPI Library 2021.6 for Linux* OS\n", true)]
    [InlineData("MVAPICH2 Version      :\t2.3.7\n", true)]
    [InlineData("MPI VERSION    : CRAY MPICH version 8.1.4.31 (ANL base 3.4a2)\n", true)]
    [InlineData("Open MPI v4.1.2, package: Debian OpenMPI, ident: 4.1.2, repo rev: v4.1.2, Nov 24, 2021", false)]
    [InlineData("Spectrum MPI 10.4", false)]
    public void Classify_MpichAbiAccepted_OpenMpiAndOthersRefusedWithTheFix(string version, bool accepted)
    {
        string? problem = MpichLibrary.Classify("libmpi.so.12", version);
        Assert.Equal(accepted, problem is null);
        if (accepted) return;
        Assert.Contains("libmpi.so.12", problem, StringComparison.Ordinal);
        Assert.Contains("apt-get install -y mpich", problem, StringComparison.Ordinal);
        Assert.Contains("mpiexec.mpich", problem, StringComparison.Ordinal);
        if (version.StartsWith("Open MPI", StringComparison.Ordinal)) Assert.Contains("is Open MPI ('Open MPI v4.1.2", problem, StringComparison.Ordinal);
    }
}
