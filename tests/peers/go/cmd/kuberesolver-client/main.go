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
// The control server (HTTP/1.1) is package control's: /counts, /reset, /last, /first and
// /failures.
//
// Stdout carries "control listening on IP:PORT" once the control server listens, then
// "kuberesolver client ready" after the first successful reply. Errors go to stderr, at most one
// line a second. SIGTERM or SIGINT stop the calls and the process.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
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
	"syscall"
	"time"

	"github.com/sercand/kuberesolver/v6"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	_ "google.golang.org/grpc/health" // registers the client-side health check (healthCheckConfig)
	"google.golang.org/grpc/status"

	"kubegrpc.io/peers/internal/control"
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
	controlAddress := flag.String("control", "127.0.0.1:0", "the control server's address, IP:PORT (port 0: any free port)")
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

	c := control.NewCounts()
	listener, err := net.Listen("tcp", *controlAddress)
	if err != nil {
		log.Fatalf("cannot listen on %s: %v", *controlAddress, err)
	}
	go func() { log.Fatalf("control server: %v", http.Serve(listener, c.Handler())) }()
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
	errorLog := &control.RateLimitedLog{Every: time.Second}
	codec := echo.NewCodec()
	var ready sync.Once
	var calls sync.WaitGroup
	call := func(n uint64) {
		defer calls.Done()
		sentAt := time.Now()
		window := c.Sent()
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
				c.Forget(window) // stopping: not the backends' fault
				return
			}
			c.Failed(window, sentAt, status.Code(err), err.Error())
			errorLog.Printf("call %d: %v", n, err)
			return
		}
		c.OK(window, backend, time.Now())
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
