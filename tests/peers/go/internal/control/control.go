// Package control is the client peers' counting and their HTTP control API (read by the Rust
// end-to-end tests and benchmarks):
//
//	GET  /counts    {"ok":{"10.250.1.1:50051":123,...},"failed":{"Unavailable":2,...},"sent":N,"in_flight":M}
//	POST /reset     zeroes ok, failed, sent and in_flight, and clears /last and /first (answers
//	                the counts before)
//	GET  /last      per backend, the Unix time in nanoseconds of its latest successful reply
//	GET  /first     per backend, the Unix time in nanoseconds of its first successful reply
//	                since the last reset
//	GET  /failures  every failed call since the start (the first 100000): sent (Unix ns),
//	                code, message
//
// Counts are per window (from the start or the last reset): a call counts in the window it was
// sent in, so ok + failed + in_flight == sent always; a reply to a call sent before a reset is
// not counted, but still updates /last.
package control

import (
	"encoding/json"
	"fmt"
	"log"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
)

// Counts are the control server's counts, per window (from the start or the last reset).
type Counts struct {
	mu       sync.Mutex
	window   uint64 // which window the counts are for: reset starts a new one
	okBy     map[string]uint64
	failedBy map[string]uint64
	sentN    uint64
	inFlight uint64
	last     map[string]int64
	first    map[string]int64
	failures []failure
}

// failure is one failed call, for GET /failures.
type failure struct {
	Sent    int64  `json:"sent"`
	Code    string `json:"code"`
	Message string `json:"message"`
}

// maxFailures bounds the failures kept for GET /failures.
const maxFailures = 100000

func NewCounts() *Counts {
	return &Counts{okBy: map[string]uint64{}, failedBy: map[string]uint64{}, last: map[string]int64{}, first: map[string]int64{}}
}

// Sent counts a call sent and returns its window.
func (c *Counts) Sent() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sentN++
	c.inFlight++
	return c.window
}

// OK counts a successful call sent in window, answered by backend at time at.
func (c *Counts) OK(window uint64, backend string, at time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.last[backend] = at.UnixNano()
	if _, seen := c.first[backend]; !seen {
		c.first[backend] = at.UnixNano()
	}
	if window == c.window {
		c.inFlight--
		c.okBy[backend]++
	}
}

// Failed counts a call sent in window (at time sent) that failed with code and message.
func (c *Counts) Failed(window uint64, sent time.Time, code codes.Code, message string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.failures) < maxFailures {
		c.failures = append(c.failures, failure{Sent: sent.UnixNano(), Code: code.String(), Message: message})
	}
	if window == c.window {
		c.inFlight--
		c.failedBy[code.String()]++
	}
}

// Forget uncounts a call that ended without an outcome.
func (c *Counts) Forget(window uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if window == c.window {
		c.inFlight--
		c.sentN--
	}
}

type countsJSON struct {
	OK       map[string]uint64 `json:"ok"`
	Failed   map[string]uint64 `json:"failed"`
	Sent     uint64            `json:"sent"`
	InFlight uint64            `json:"in_flight"`
}

// snapshot returns the counts; with reset it also starts a new window.
func (c *Counts) snapshot(reset bool) countsJSON {
	c.mu.Lock()
	defer c.mu.Unlock()
	snapshot := countsJSON{OK: c.okBy, Failed: c.failedBy, Sent: c.sentN, InFlight: c.inFlight}
	if reset {
		c.window++
		c.okBy, c.failedBy, c.sentN, c.inFlight = map[string]uint64{}, map[string]uint64{}, 0, 0
		c.last, c.first = map[string]int64{}, map[string]int64{}
	} else {
		snapshot.OK, snapshot.Failed = clone(c.okBy), clone(c.failedBy)
	}
	return snapshot
}

func (c *Counts) times(first bool) map[string]int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if first {
		return clone(c.first)
	}
	return clone(c.last)
}

func clone[V any](m map[string]V) map[string]V {
	out := make(map[string]V, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// Handler serves GET /counts, POST /reset, GET /last, GET /first and GET /failures.
func (c *Counts) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /counts", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, c.snapshot(false)) })
	mux.HandleFunc("POST /reset", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, c.snapshot(true)) })
	mux.HandleFunc("GET /last", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, c.times(false)) })
	mux.HandleFunc("GET /first", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, c.times(true)) })
	mux.HandleFunc("GET /failures", func(w http.ResponseWriter, _ *http.Request) {
		c.mu.Lock()
		failures := append([]failure{}, c.failures...)
		c.mu.Unlock()
		writeJSON(w, failures)
	})
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(append(body, '\n'))
}

// RateLimitedLog prints at most one line per period, saying how many it held back meanwhile.
type RateLimitedLog struct {
	Every      time.Duration
	mu         sync.Mutex
	next       time.Time
	suppressed atomic.Uint64
}

// Printf logs, unless a line was logged less than Every ago.
func (l *RateLimitedLog) Printf(format string, args ...any) {
	l.mu.Lock()
	now := time.Now()
	if now.Before(l.next) {
		l.mu.Unlock()
		l.suppressed.Add(1)
		return
	}
	l.next = now.Add(l.Every)
	l.mu.Unlock()
	message := fmt.Sprintf(format, args...)
	if n := l.suppressed.Swap(0); n > 0 {
		message += fmt.Sprintf(" (and %d more errors since the last line)", n)
	}
	log.Print(message)
}
