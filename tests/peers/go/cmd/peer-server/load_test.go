package main

import (
	"context"
	"math"
	"net"
	"testing"
	"time"

	orcaservice "github.com/cncf/xds/go/xds/service/orca/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"
)

func near(a, b float64) bool { return math.Abs(a-b) < 1e-9 }

func TestTheWindowCoversTheLastFiveBuckets(t *testing.T) {
	start := time.Unix(1000, 0)
	l := newLoad(2, 0, start)
	at := func(seconds int) time.Time { return start.Add(time.Duration(seconds) * time.Second) }

	// Bucket 1: 10 calls, 2 failed, 1 s of busy time.
	for i := range 10 {
		l.recordCall(i >= 2)
	}
	l.addBusy(time.Second)
	m := l.rotate(at(1))
	if !near(m.qps, 10) || !near(m.eps, 2) || !near(m.applicationUtilization, 0.5) {
		t.Fatalf("after one bucket: %+v", m)
	}
	// Four idle buckets: the window still holds bucket 1, over 5 s.
	for s := 2; s <= 5; s++ {
		m = l.rotate(at(s))
	}
	if !near(m.qps, 2) || !near(m.eps, 0.4) || !near(m.applicationUtilization, 0.1) {
		t.Fatalf("after five buckets: %+v", m)
	}
	// The sixth bucket pushes bucket 1 out.
	l.recordCall(true)
	m = l.rotate(at(6))
	if !near(m.qps, 0.2) || m.eps != 0 || m.applicationUtilization != 0 {
		t.Fatalf("after six buckets: %+v", m)
	}
}

func TestCallsBeyondCapacityWaitForASlotAndTheirWorkIsBusyTime(t *testing.T) {
	work := 30 * time.Millisecond
	l := newLoad(1, work, time.Now())
	started := time.Now()
	done := make(chan error)
	for range 3 {
		go func() { done <- l.doWork(context.Background()) }()
	}
	for range 3 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if elapsed := time.Since(started); elapsed < 3*work {
		t.Fatalf("3 calls on 1 slot took %v, less than 3 x %v", elapsed, work)
	}
	if busy := l.current.busy; busy < 3*work || busy > 3*work+3*work/2 {
		t.Fatalf("busy %v for 3 x %v of work", busy, work)
	}
}

// grpc-go's ORCA service honours a minimum below its 30 s default once registerORCA has
// unlocked it.
func TestORCAReportsComeAtTheAskedIntervalBelowThirtySeconds(t *testing.T) {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	recorder, err := registerORCA(server, 100*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	recorder.SetApplicationUtilization(0.25)
	recorder.SetQPS(40)
	go server.Serve(listener)
	defer server.Stop()

	conn, err := grpc.NewClient(listener.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := orcaservice.NewOpenRcaServiceClient(conn).StreamCoreMetrics(ctx,
		&orcaservice.OrcaLoadReportRequest{ReportInterval: durationpb.New(200 * time.Millisecond)})
	if err != nil {
		t.Fatal(err)
	}
	var last time.Time
	for i := range 3 {
		report, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if report.GetApplicationUtilization() != 0.25 || report.GetRpsFractional() != 40 {
			t.Fatalf("report %d: %v", i, report)
		}
		now := time.Now()
		if i > 0 {
			if gap := now.Sub(last); gap < 150*time.Millisecond || gap > 5*time.Second {
				t.Fatalf("report %d came %v after the previous one; asked for 200ms", i, gap)
			}
		}
		last = now
	}
}
