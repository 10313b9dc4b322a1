package main

import (
	"context"
	"fmt"
	"reflect"
	"sync"
	"time"
	"unsafe"

	"google.golang.org/grpc"
	"google.golang.org/grpc/orca"
	"google.golang.org/grpc/status"
)

// The ORCA metrics cover the Echo calls of the last loadWindowBuckets buckets of
// loadBucketLength each: a sliding window of about 5 s, moved every second.
const (
	loadBucketLength  = time.Second
	loadWindowBuckets = 5
)

// load is the Echo method's simulated capacity (worker slots, each held for the work's time)
// and the load it measures: calls, failed calls, and the time slots were held.
type load struct {
	capacity int
	slots    chan struct{} // nil: no limit
	work     time.Duration

	mu      sync.Mutex
	current loadBucket
	window  []loadBucket // the closed buckets, oldest first
}

type loadBucket struct {
	start, end       time.Time
	requests, errors uint64
	busy             time.Duration
}

// newLoad: capacity 0 means no limit (and counts as one slot for the utilization).
func newLoad(capacity int, work time.Duration, now time.Time) *load {
	l := &load{capacity: max(capacity, 1), work: work, current: loadBucket{start: now}}
	if capacity > 0 {
		l.slots = make(chan struct{}, capacity)
	}
	return l
}

// doWork holds a slot (waiting for one first) for the work's time, and records that time as
// busy time, also when the call is cancelled meanwhile.
func (l *load) doWork(ctx context.Context) error {
	if l.slots == nil && l.work == 0 {
		return nil
	}
	if l.slots != nil {
		select {
		case l.slots <- struct{}{}:
			defer func() { <-l.slots }()
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		}
	}
	start := time.Now()
	defer func() { l.addBusy(time.Since(start)) }()
	if l.work > 0 {
		timer := time.NewTimer(l.work)
		defer timer.Stop()
		select {
		case <-timer.C:
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		}
	}
	return nil
}

func (l *load) addBusy(busy time.Duration) {
	l.mu.Lock()
	l.current.busy += busy
	l.mu.Unlock()
}

// recordCall counts one finished Echo call.
func (l *load) recordCall(ok bool) {
	l.mu.Lock()
	l.current.requests++
	if !ok {
		l.current.errors++
	}
	l.mu.Unlock()
}

// loadMetrics are what ORCA reports.
type loadMetrics struct {
	qps, eps, applicationUtilization float64
}

// rotate closes the current bucket at now, drops buckets beyond the window, and returns the
// metrics over the window.
func (l *load) rotate(now time.Time) loadMetrics {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.current.end = now
	l.window = append(l.window, l.current)
	if len(l.window) > loadWindowBuckets {
		l.window = l.window[len(l.window)-loadWindowBuckets:]
	}
	l.current = loadBucket{start: now}
	var total loadBucket
	for _, bucket := range l.window {
		total.requests += bucket.requests
		total.errors += bucket.errors
		total.busy += bucket.busy
	}
	elapsed := now.Sub(l.window[0].start).Seconds()
	if elapsed <= 0 {
		return loadMetrics{}
	}
	return loadMetrics{
		qps:                    float64(total.requests) / elapsed,
		eps:                    float64(total.errors) / elapsed,
		applicationUtilization: total.busy.Seconds() / (elapsed * float64(l.capacity)),
	}
}

// publish moves the window every loadBucketLength and sets the recorder's metrics from it,
// until ctx ends.
func (l *load) publish(ctx context.Context, recorder orca.ServerMetricsRecorder) {
	ticker := time.NewTicker(loadBucketLength)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-ticker.C:
			metrics := l.rotate(now)
			recorder.SetQPS(metrics.qps)
			recorder.SetEPS(metrics.eps)
			recorder.SetApplicationUtilization(metrics.applicationUtilization)
		}
	}
}

// registerORCA serves grpc-go's own out-of-band ORCA service (xds.service.orca.v3.OpenRcaService)
// on server, reporting what the returned recorder holds, at most once per minInterval on each
// stream.
//
// grpc-go (checked in v1.83.2, orca/service.go, NewService) raises any MinReportingInterval below
// 30 s to 30 s, unless the unexported ServiceOptions.allowAnyMinReportingInterval is set, which
// only grpc-go's own tests can reach (through its internal package). Tests cannot wait 30 s per
// report, so below 30 s that field is set by reflection; if a grpc-go version renames it, the
// server refuses to start rather than silently report every 30 s. A stream with no interval in
// its request gets the minimum; each report is the recorder's values at that moment (grpc-go
// keeps no per-stream window).
func registerORCA(server *grpc.Server, minInterval time.Duration) (orca.ServerMetricsRecorder, error) {
	recorder := orca.NewServerMetricsRecorder()
	options := orca.ServiceOptions{ServerMetricsProvider: recorder, MinReportingInterval: minInterval}
	if minInterval < 30*time.Second {
		field := reflect.ValueOf(&options).Elem().FieldByName("allowAnyMinReportingInterval")
		if !field.IsValid() || field.Kind() != reflect.Bool {
			return nil, fmt.Errorf("grpc-go %s has no orca.ServiceOptions.allowAnyMinReportingInterval: "+
				"cannot report more often than every 30 s", grpc.Version)
		}
		reflect.NewAt(field.Type(), unsafe.Pointer(field.UnsafeAddr())).Elem().SetBool(true)
	}
	if err := orca.Register(server, options); err != nil {
		return nil, err
	}
	return recorder, nil
}
