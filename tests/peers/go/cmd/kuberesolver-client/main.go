// Command kuberesolver-client is a grpc-go client peer resolving through
// github.com/sercand/kuberesolver/v6, the resolver many Go users pick to balance over a
// Kubernetes Service's endpoints: it watches the Service's EndpointSlices on the apiserver
// itself and hands their ready addresses to grpc-go's round_robin. It calls
// kubegrpc.echo.v1.Echo/Echo at a fixed rate (open loop), counting the replies per backend and
// the failures per gRPC code, for the Rust benches to read over a small HTTP server.
//
//	kuberesolver-client --target kubernetes:///NAME.NAMESPACE:PORT --apiserver https://IP:PORT
//	                    --ca FILE (--client-cert FILE --client-key FILE | --token-file FILE)
//	                    [--health-check] [--rate N] [--timeout D] [--control IP:PORT]
//
// kuberesolver's own constructors read in-cluster ServiceAccount files or talk plain HTTP; this
// command implements its small K8sClient interface with an http.Client that trusts --ca and
// authenticates with a client certificate or a bearer token. The credential needs get, list
// and watch on discovery.k8s.io endpointslices in the namespace.
//
// With --health-check, grpc-go's client-side health checking (gRFC A17) is on: the service
// config carries healthCheckConfig {"serviceName": ""}, so each subchannel keeps a
// grpc.health.v1.Health/Watch stream to its backend and round_robin skips a backend that
// answers anything but SERVING. Without it, the client sends to every address the resolver
// gives, whatever the backend's health.
//
// The control server (HTTP/1.1) answers, as xds-client's does,
//
//	GET  /counts  {"ok":{"10.250.1.1:50051":123,...},"failed":{"Unavailable":2,...},"sent":N,"in_flight":M}
//	POST /reset   zeroes ok, failed, sent and in_flight, and clears /last and /first (answers the counts before)
//	GET  /last    {"10.250.1.1:50051":1712345678901234567,...}: per backend, the Unix time in
//	              nanoseconds at which its latest successful reply arrived
//	GET  /first   the same for the first successful reply since the start or the last reset
//	GET  /failures [{"sent":UNIX_NS,"code":"Unavailable","message":"..."},...]: every failed call
//	              since the start (the first 100000), with the time it was sent; never reset
//
// Stdout carries "control listening on IP:PORT" once the control server listens, then
// "kuberesolver client ready" after the first successful reply. Errors go to stderr, at most one
// line a second. SIGTERM or SIGINT stop the calls and the process.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sercand/kuberesolver/v6"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	_ "google.golang.org/grpc/health" // registers the client-side health check (healthCheckConfig)
	"google.golang.org/grpc/status"

	"kubegrpc.io/peers/internal/echo"
)

const (
	plainServiceConfig  = `{"loadBalancingConfig":[{"round_robin":{}}]}`
	healthServiceConfig = `{"loadBalancingConfig":[{"round_robin":{}}],"healthCheckConfig":{"serviceName":""}}`
)

func main() {
	target := flag.String("target", "", "a kuberesolver target, kubernetes:///NAME.NAMESPACE:PORT (PORT a name or number; required)")
	apiserver := flag.String("apiserver", "", "the apiserver's URL, https://IP:PORT (required)")
	caFile := flag.String("ca", "", "the CA certificate (PEM) that signed the apiserver's serving certificate (required)")
	certFile := flag.String("client-cert", "", "a client certificate (PEM) to authenticate with")
	keyFile := flag.String("client-key", "", "the client certificate's key (PEM)")
	tokenFile := flag.String("token-file", "", "a file holding a bearer token to authenticate with")
	healthCheck := flag.Bool("health-check", false, "turn on grpc-go's client-side health checking (healthCheckConfig, serviceName \"\")")
	rate := flag.Float64("rate", 100, "Echo calls per second, sent on schedule whatever the replies (open loop)")
	timeout := flag.Duration("timeout", 2*time.Second, "each call's deadline")
	control := flag.String("control", "127.0.0.1:0", "the control server's address, IP:PORT (port 0: any free port)")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("kuberesolver-client: ")
	if !strings.HasPrefix(*target, "kubernetes:") || *apiserver == "" || *caFile == "" || flag.NArg() != 0 ||
		!(*rate > 0) || *rate > 1e6 || *timeout <= 0 || (*certFile == "") != (*keyFile == "") {
		flag.Usage()
		os.Exit(2)
	}

	k8s, err := newK8sClient(*apiserver, *caFile, *certFile, *keyFile, *tokenFile)
	if err != nil {
		log.Fatalf("cannot make the apiserver client: %v", err)
	}
	serviceConfig := plainServiceConfig
	if *healthCheck {
		serviceConfig = healthServiceConfig
	}
	options := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithResolvers(kuberesolver.NewBuilder(k8s, "kubernetes")),
		grpc.WithDefaultServiceConfig(serviceConfig),
	}

	c := newCounts()
	listener, err := net.Listen("tcp", *control)
	if err != nil {
		log.Fatalf("cannot listen on %s: %v", *control, err)
	}
	go func() { log.Fatalf("control server: %v", http.Serve(listener, c.handler())) }()
	fmt.Printf("control listening on %s\n", listener.Addr())
	_ = os.Stdout.Sync()

	conn, err := grpc.NewClient(*target, options...)
	if err != nil {
		log.Fatalf("cannot create the channel to %s: %v", *target, err)
	}
	conn.Connect() // start the resolver's watch now, not at the first call
	log.Printf("calling %s at %s, %g calls/s, deadline %v, service config %s", echo.EchoMethod, *target, *rate, *timeout, serviceConfig)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	errorLog := &rateLimitedLog{every: time.Second}
	codec := echo.NewCodec()
	var ready sync.Once
	var calls sync.WaitGroup
	call := func(n uint64) {
		defer calls.Done()
		sentAt := time.Now()
		window := c.sent()
		callCtx, cancel := context.WithTimeout(ctx, *timeout)
		defer cancel()
		var reply []byte
		err := conn.Invoke(callCtx, echo.EchoMethod, echo.EncodeEchoRequest(strconv.FormatUint(n, 10), 0), &reply,
			grpc.ForceCodecV2(codec))
		var backend string
		if err == nil {
			if _, backend, err = echo.DecodeEchoReply(reply); err == nil && backend == "" {
				err = errors.New("EchoReply without a backend")
			}
			if err != nil {
				err = status.Error(codes.Internal, err.Error())
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				c.forget(window) // stopping: not the backends' fault
				return
			}
			c.failed(window, sentAt, status.Code(err), err.Error())
			errorLog.printf("call %d: %v", n, err)
			return
		}
		c.ok(window, backend, time.Now())
		ready.Do(func() {
			log.Printf("first reply, from %s", backend)
			fmt.Println("kuberesolver client ready")
			_ = os.Stdout.Sync()
		})
	}

	// Open loop: call n goes out at start + n/rate, whatever happened to the calls before; a late
	// wake-up sends every call that is due.
	start := time.Now()
	tick := max(time.Duration(float64(time.Second) / *rate), time.Millisecond)
	ticker := time.NewTicker(tick)
	var sent uint64
loop:
	for {
		due := uint64(time.Since(start).Seconds()**rate) + 1
		for ; sent < due; sent++ {
			calls.Add(1)
			go call(sent)
		}
		select {
		case <-ctx.Done():
			break loop
		case <-ticker.C:
		}
	}
	ticker.Stop()
	log.Printf("stopping: waiting for the calls in flight")
	calls.Wait()
	_ = conn.Close()
}

// k8sClient is kuberesolver's K8sClient over HTTPS, trusting one CA and authenticating with a
// client certificate or a bearer token.
type k8sClient struct {
	host       string
	token      string
	httpClient *http.Client
}

func newK8sClient(host, caFile, certFile, keyFile, tokenFile string) (*k8sClient, error) {
	ca, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("no certificate in %s", caFile)
	}
	config := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	if certFile != "" {
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, err
		}
		config.Certificates = []tls.Certificate{pair}
	}
	client := &k8sClient{
		host: strings.TrimSuffix(host, "/"),
		// No overall timeout: the watch is one long response.
		httpClient: &http.Client{Transport: &http.Transport{TLSClientConfig: config, ForceAttemptHTTP2: true}},
	}
	if tokenFile != "" {
		token, err := os.ReadFile(tokenFile)
		if err != nil {
			return nil, err
		}
		client.token = strings.TrimSpace(string(token))
	}
	return client, nil
}

func (k *k8sClient) GetRequest(url string) (*http.Request, error) {
	if !strings.HasPrefix(url, k.host) {
		url = k.host + "/" + strings.TrimPrefix(url, "/")
	}
	request, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	if k.token != "" {
		request.Header.Set("Authorization", "Bearer "+k.token)
	}
	return request, nil
}

func (k *k8sClient) Do(request *http.Request) (*http.Response, error) {
	return k.httpClient.Do(request)
}

func (k *k8sClient) Host() string { return k.host }

// counts are the control server's counts, per window (from the start or the last reset).
type counts struct {
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

func newCounts() *counts {
	return &counts{okBy: map[string]uint64{}, failedBy: map[string]uint64{}, last: map[string]int64{}, first: map[string]int64{}}
}

// sent counts a call sent and returns its window.
func (c *counts) sent() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sentN++
	c.inFlight++
	return c.window
}

func (c *counts) ok(window uint64, backend string, at time.Time) {
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

func (c *counts) failed(window uint64, sent time.Time, code codes.Code, message string) {
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

// forget uncounts a call that ended without an outcome.
func (c *counts) forget(window uint64) {
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
func (c *counts) snapshot(reset bool) countsJSON {
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

func (c *counts) times(first bool) map[string]int64 {
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

func (c *counts) handler() http.Handler {
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

// rateLimitedLog prints at most one line per period, saying how many it held back meanwhile.
type rateLimitedLog struct {
	every      time.Duration
	mu         sync.Mutex
	next       time.Time
	suppressed atomic.Uint64
}

func (l *rateLimitedLog) printf(format string, args ...any) {
	l.mu.Lock()
	now := time.Now()
	if now.Before(l.next) {
		l.mu.Unlock()
		l.suppressed.Add(1)
		return
	}
	l.next = now.Add(l.every)
	l.mu.Unlock()
	message := fmt.Sprintf(format, args...)
	if n := l.suppressed.Swap(0); n > 0 {
		message += fmt.Sprintf(" (and %d more errors since the last line)", n)
	}
	log.Print(message)
}
