using Distributed.Cluster.TestWorker;
using Xunit;

namespace Distributed.Cluster.Tests;

/// <summary>The ICommunicator contract on in-process ranks, P in {1,2,3,4}.</summary>
public sealed class InProcessContractTests
{
    public static TheoryData<string, int> Cases()
    {
        var data = new TheoryData<string, int>();
        foreach (string name in CommunicatorContract.Names)
            foreach (int p in new[] { 1, 2, 3, 4 })
                data.Add(name, p);
        return data;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Contract_HoldsOnEveryRank(string check, int ranks)
    {
        var done = InProcessCommunicator.Run(ranks, comm => { CommunicatorContract.Run(check, comm); return comm.Rank; }, TimeSpan.FromSeconds(30));
        Assert.Equal(Enumerable.Range(0, ranks), done);
    }

    [Fact]
    public void Run_RankThrows_OthersReleasedAndRankNamed()
    {
        var start = DateTime.UtcNow;
        var e = Assert.Throws<RankFailedException>(() => InProcessCommunicator.Run(4, comm =>
        {
            comm.Barrier();
            if (comm.Rank == 2) throw new InvalidOperationException("boom on two");
            var x = new float[8];
            comm.AllReduceSum(x, x); // ranks 0, 1, 3 wait here for rank 2, which never comes
            return 0;
        }, TimeSpan.FromSeconds(60)));
        Assert.Equal(2, e.Rank);
        Assert.Contains("rank 2 failed", e.Message, StringComparison.Ordinal);
        Assert.IsType<InvalidOperationException>(e.InnerException);
        Assert.True(DateTime.UtcNow - start < TimeSpan.FromSeconds(10));
    }

    [Fact]
    public void Run_RankThrowsWhileOthersWaitOnPointToPoint_Released()
    {
        var e = Assert.Throws<RankFailedException>(() => InProcessCommunicator.Run(3, comm =>
        {
            if (comm.Rank == 0) throw new ArgumentException("bad shard", "q");
            var buf = new float[4];
            var req = comm.StartSendRecv(new float[4], (comm.Rank + 1) % 3, buf, (comm.Rank + 2) % 3);
            req.Wait();
            return 0;
        }, TimeSpan.FromSeconds(60)));
        Assert.Equal(0, e.Rank);
    }

    [Fact]
    public void Run_Hang_TimesOutNamingTheCollective()
    {
        var e = Assert.Throws<RankFailedException>(() => InProcessCommunicator.Run(2, comm =>
        {
            if (comm.Rank == 0) Thread.Sleep(TimeSpan.FromSeconds(6)); // still computing at the deadline
            comm.Barrier();
            return 0;
        }, TimeSpan.FromSeconds(2)));
        Assert.IsType<TimeoutException>(e.InnerException);
        Assert.Contains("rank 0 in computation", e.Message, StringComparison.Ordinal);
        Assert.Contains("rank 1 in Barrier #1", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Run_RankReturnsEarly_WaitersFailAtOnceNamingIt()
    {
        var start = DateTime.UtcNow;
        var e = Assert.Throws<RankFailedException>(() => InProcessCommunicator.Run(3, comm =>
        {
            comm.Barrier();
            if (comm.Rank != 2) comm.Barrier(); // rank 2 makes one collective call fewer
            return 0;
        }));
        // Ranks 0 and 1 both wait; whichever notices first is the reported failure.
        Assert.Contains(e.Rank, new[] { 0, 1 });
        Assert.Contains("rank 2 has already returned", e.Message, StringComparison.Ordinal);
        Assert.True(DateTime.UtcNow - start < TimeSpan.FromSeconds(10));
    }

    [Fact]
    public void Run_RankReturnsEarly_InSubgroup_Detected()
    {
        var e = Assert.Throws<RankFailedException>(() => InProcessCommunicator.Run(4, comm =>
        {
            using var sub = comm.Split(comm.Rank % 2, comm.Rank);
            if (comm.Rank != 3) sub.Barrier(); // world rank 3 (sub-rank 1 of the odd group) skips it
            return 0;
        }));
        Assert.Equal(1, e.Rank);
        Assert.Contains("rank 3 has already returned", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Run_ReceiveFromReturnedRank_Detected()
    {
        var e = Assert.Throws<RankFailedException>(() => InProcessCommunicator.Run(2, comm =>
        {
            if (comm.Rank == 1) return 0;
            comm.SendRecv(new float[2], 1, new float[2], 1);
            return 0;
        }));
        Assert.Equal(0, e.Rank);
        Assert.Contains("from rank 1, which has already returned", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void AllGather_WrongReceiveLength_NamesParameter()
    {
        var e = Assert.Throws<RankFailedException>(() => InProcessCommunicator.Run(2, comm =>
        {
            comm.AllGather(new float[3], new float[5]);
            return 0;
        }, TimeSpan.FromSeconds(10)));
        Assert.Equal("receive", Assert.IsType<ArgumentException>(e.InnerException).ParamName);
    }

    [Fact]
    public void StartAllGather_OverlappingBuffers_Refused()
    {
        var e = Assert.Throws<RankFailedException>(() => InProcessCommunicator.Run(2, comm =>
        {
            var buffer = new float[8];
            comm.StartAllGather(buffer.AsMemory(0, 4), buffer.AsMemory()).Wait();
            return 0;
        }, TimeSpan.FromSeconds(10)));
        Assert.Equal("receive", Assert.IsType<ArgumentException>(e.InnerException).ParamName);
    }

    [Fact]
    public void Run_RankReturnsEarly_WhileOthersWaitOnStartedGather_Detected()
    {
        var e = Assert.Throws<RankFailedException>(() => InProcessCommunicator.Run(3, comm =>
        {
            if (comm.Rank == 1) return 0; // never starts the gather
            var req = comm.StartAllGather(new float[2], new float[6]);
            req.Wait();
            return 0;
        }, TimeSpan.FromSeconds(30)));
        Assert.Contains(e.Rank, new[] { 0, 2 });
        Assert.Contains("rank 1 has already returned", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void StartedGather_WaitingIsNamedInTimeoutReport()
    {
        var e = Assert.Throws<RankFailedException>(() => InProcessCommunicator.Run(2, comm =>
        {
            if (comm.Rank == 0) Thread.Sleep(TimeSpan.FromSeconds(6));
            comm.StartAllGather(new float[1], new float[2]).Wait();
            return 0;
        }, TimeSpan.FromSeconds(2)));
        Assert.Contains("rank 1 in StartAllGather.Wait #1", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Split_NegativeColor_NamesParameter()
    {
        var e = Assert.Throws<RankFailedException>(() => InProcessCommunicator.Run(1, comm => comm.Split(-1, 0).Size, TimeSpan.FromSeconds(10)));
        Assert.Equal("color", Assert.IsType<ArgumentOutOfRangeException>(e.InnerException).ParamName);
    }

    [Fact]
    public void Split_GroupsHaveTheirOwnCounters()
    {
        InProcessCommunicator.Run(2, comm =>
        {
            using var sub = comm.Split(0, comm.Rank);
            var x = new float[6];
            sub.AllReduceSum(x, x);
            Assert.Equal(new CommOpCount(1, 24, 24), sub.Counters[CommOp.AllReduce]);
            Assert.Equal(1, sub.CollectiveSequence);
            Assert.Equal(default, comm.Counters[CommOp.AllReduce]);
            Assert.Equal(1, comm.Counters[CommOp.Split].Calls);
            return 0;
        }, TimeSpan.FromSeconds(10));
    }

    [Fact]
    public void Run_ZeroRanks_Refused()
    {
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => InProcessCommunicator.Run(0, _ => 0));
        Assert.Equal("size", e.ParamName);
    }

    [Fact]
    public void RankRunner_InProcess_ExitCodesAndFailureReport()
    {
        var none = new LaunchEnvironment(LaunchKind.None, 0, 1, -1, -1);
        var err = new StringWriter();
        Assert.Equal(0, RankRunner.Run(none, 3, _ => 0, TimeSpan.FromSeconds(10), err));
        // The lowest rank's non-zero code is the job's.
        Assert.Equal(7, RankRunner.Run(none, 4, c => c.Rank switch { 1 => 0, 2 => 7, 3 => 9, _ => 0 }, TimeSpan.FromSeconds(10), err));
        Assert.Equal("", err.ToString());
        Assert.Equal(1, RankRunner.Run(none, 2, c => c.Rank == 1 ? throw new DivideByZeroException("x") : 0, TimeSpan.FromSeconds(10), err));
        Assert.StartsWith("rank 1 failed: DivideByZeroException: x", err.ToString(), StringComparison.Ordinal);
        Assert.Equal("inProcessRanks", Assert.Throws<ArgumentOutOfRangeException>(() => RankRunner.Run(none, 0, _ => 0)).ParamName);
    }

    [Fact]
    public void RankRunner_OpenMpi_Refused()
    {
        var err = new StringWriter();
        bool ran = false;
        Assert.Equal(1, RankRunner.Run(new LaunchEnvironment(LaunchKind.OpenMpi, 3, 4, 0, 1), 2, _ => { ran = true; return 0; }, null, err));
        Assert.False(ran);
        Assert.Contains("rank 3 failed: Open MPI", err.ToString(), StringComparison.Ordinal);
        Assert.Contains("apt-get install mpich", err.ToString(), StringComparison.Ordinal);
    }

    [Fact]
    public void Messages_AreCopies_NotShared()
    {
        InProcessCommunicator.Run(2, comm =>
        {
            var send = new float[] { comm.Rank, comm.Rank };
            var recv = new float[4];
            comm.AllGather(send, recv);
            send[0] = 99; // mutating after the call must not reach the other rank's result
            comm.Barrier();
            Assert.Equal(new float[] { 0, 0, 1, 1 }, recv);
            return 0;
        }, TimeSpan.FromSeconds(10));
    }
}
