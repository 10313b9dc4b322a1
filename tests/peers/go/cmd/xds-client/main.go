// Command xds-client is a grpc-go xDS client peer: it dials an xds:/// target through grpc-go's
// own xDS resolver and balancers (ADS, state of the world, against the bootstrap's server) and
// calls kubegrpc.echo.v1.Echo/Echo at a fixed rate (open loop), counting the replies per backend
// and the failures per gRPC code, for the Rust end-to-end tests to read over a small HTTP server.
//
//	xds-client --target xds:///echo.ns [--target xds:///echo.other ...] [--bootstrap FILE]
//	           [--rate N] [--timeout D] [--control IP:PORT]
//	           [--method /SERVICE/METHOD] [--metadata KEY=VALUE ...]
//
// --method calls another method instead (for xDS routes that match on it): its request is an empty
// message and its reply is not read, so the answering backend is the call's peer address (Echo's
// reply names the backend itself). --metadata sends a metadata entry with every call (repeat for
// more; a key given twice sends both values), for routes that match on headers.
//
// With several targets, one channel each (all on the one xDS client and ADS stream grpc-go keeps
// per bootstrap), the calls take turns over them: the rate is the total.
//
// The bootstrap comes from --bootstrap (read by this process and handed to an xDS resolver of its
// own), or else from the GRPC_XDS_BOOTSTRAP (a file) or GRPC_XDS_BOOTSTRAP_CONFIG (the JSON
// itself) environment variables. Setting those variables from inside the process would not
// work: grpc-go reads them once, when its packages initialize. A sample bootstrap:
//
//	{"xds_servers":[{"server_uri":"10.250.0.1:18000","channel_creds":[{"type":"insecure"}],
//	  "server_features":["xds_v3","ignore_resource_deletion"]}],
//	 "node":{"id":"kubegrpc-test","locality":{"zone":"zone-a"}}}
//
// Channel credentials are grpc-go's xDS credentials with plaintext as the fallback: a Cluster with
// an UpstreamTlsContext is dialed over TLS with the bootstrap's certificate_providers (gRFC A29),
// any other in plaintext.
//
// The control server (HTTP/1.1) is package control's: /counts, /reset, /last, /first and
// /failures (per-window counts; see its docs).
//
// Stdout carries "control listening on IP:PORT" once the control server listens, then
// "xds client ready" after the first successful reply. Errors go to stderr, at most one line a
// second. SIGTERM or SIGINT stop the calls and the process.
package main

import (
	"context"
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

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	grpcmetadata "google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/xds" // registers the xds resolver, balancers and HTTP filters

	"kubegrpc.io/peers/internal/control"
	"kubegrpc.io/peers/internal/echo"
)

const sampleBootstrap = `{"xds_servers":[{"server_uri":"10.250.0.1:18000","channel_creds":[{"type":"insecure"}],` +
	`"server_features":["xds_v3","ignore_resource_deletion"]}],"node":{"id":"kubegrpc-test","locality":{"zone":"zone-a"}}}`

func main() {
	var targets targetList
	flag.Var(&targets, "target", "an xDS target, xds:///NAME.NAMESPACE (required; repeat for more)")
	bootstrapFile := flag.String("bootstrap", "", "the xDS bootstrap JSON file (default: GRPC_XDS_BOOTSTRAP or GRPC_XDS_BOOTSTRAP_CONFIG from the environment)")
	rate := flag.Float64("rate", 100, "calls per second, sent on schedule whatever the replies (open loop)")
	timeout := flag.Duration("timeout", 2*time.Second, "each call's deadline")
	controlAddress := flag.String("control", "127.0.0.1:0", "the control server's address, IP:PORT (port 0: any free port)")
	method := flag.String("method", echo.EchoMethod, "the method to call, /SERVICE/METHOD (other than Echo: an empty request, the reply unread)")
	var metadata metadataList
	flag.Var(&metadata, "metadata", "a metadata entry KEY=VALUE sent with every call (repeat for more)")
	flag.Usage = func() {
		out := flag.CommandLine.Output()
		fmt.Fprintf(out, "usage: %s --target xds:///NAME.NAMESPACE [flags]\n", os.Args[0])
		flag.PrintDefaults()
		fmt.Fprintf(out, "\nA sample bootstrap:\n  %s\n", sampleBootstrap)
	}
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	log.SetPrefix("xds-client-go: ")
	if len(targets) == 0 || flag.NArg() != 0 || !(*rate > 0) || *rate > 1e6 || *timeout <= 0 || !validMethod(*method) {
		flag.Usage()
		os.Exit(2)
	}

	// xDS credentials (gRFC A29): TLS to a cluster whose Cluster resource carries an
	// UpstreamTlsContext, with the roots (and, for mutual TLS, the identity) from the bootstrap's
	// certificate_providers; plaintext to the others (the fallback). With plain insecure
	// credentials grpc-go ignores the Cluster's transport_socket and speaks plaintext.
	creds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		log.Fatalf("cannot make the xDS credentials: %v", err)
	}
	options := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if *bootstrapFile != "" {
		contents, err := os.ReadFile(*bootstrapFile)
		if err != nil {
			log.Fatalf("cannot read the bootstrap: %v", err)
		}
		// A resolver of our own with this bootstrap (grpc-go read the environment variables at
		// init already). The bootstrap is parsed when the channel builds its resolver.
		builder, err := xds.NewXDSResolverWithConfigForTesting(contents)
		if err != nil {
			log.Fatalf("bad bootstrap %s: %v", *bootstrapFile, err)
		}
		options = append(options, grpc.WithResolvers(builder))
	} else if os.Getenv("GRPC_XDS_BOOTSTRAP") == "" && os.Getenv("GRPC_XDS_BOOTSTRAP_CONFIG") == "" {
		log.Fatalf("no bootstrap: give --bootstrap FILE, or set GRPC_XDS_BOOTSTRAP or GRPC_XDS_BOOTSTRAP_CONFIG")
	}

	c := control.NewCounts()
	listener, err := net.Listen("tcp", *controlAddress)
	if err != nil {
		log.Fatalf("cannot listen on %s: %v", *controlAddress, err)
	}
	go func() { log.Fatalf("control server: %v", http.Serve(listener, c.Handler())) }()
	fmt.Printf("control listening on %s\n", listener.Addr())
	_ = os.Stdout.Sync()

	conns := make([]*grpc.ClientConn, len(targets))
	for i, target := range targets {
		conn, err := grpc.NewClient(target, options...)
		if err != nil {
			log.Fatalf("cannot create the channel to %s: %v", target, err)
		}
		conn.Connect() // resolve (fetch the xDS resources) now, not at the first call
		conns[i] = conn
	}
	log.Printf("calling %s at %s, %g calls/s, deadline %v, metadata %v", *method, strings.Join(targets, " and "), *rate, *timeout, metadata)
	isEcho := *method == echo.EchoMethod

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	errorLog := &control.RateLimitedLog{Every: time.Second}
	codec := echo.NewCodec()
	var ready sync.Once
	var calls sync.WaitGroup
	call := func(n uint64) {
		defer calls.Done()
		window, sentAt := c.Sent(), time.Now()
		callCtx, cancel := context.WithTimeout(ctx, *timeout)
		defer cancel()
		if len(metadata) > 0 {
			callCtx = grpcmetadata.AppendToOutgoingContext(callCtx, metadata...)
		}
		var reply []byte
		var answered peer.Peer
		conn := conns[n%uint64(len(conns))]
		request := []byte{}
		if isEcho {
			request = echo.EncodeEchoRequest(strconv.FormatUint(n, 10), 0)
		}
		err := conn.Invoke(callCtx, *method, request, &reply, grpc.ForceCodecV2(codec), grpc.Peer(&answered))
		var backend string
		switch {
		case err != nil:
		case isEcho:
			if _, backend, err = echo.DecodeEchoReply(reply); err == nil && backend == "" {
				err = errors.New("EchoReply without a backend")
			}
			if err != nil {
				err = status.Error(codes.Internal, err.Error())
			}
		case answered.Addr == nil:
			err = status.Error(codes.Internal, "a reply without a peer address")
		default:
			backend = answered.Addr.String()
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
			fmt.Println("xds client ready")
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
	for _, conn := range conns {
		_ = conn.Close()
	}
}

// targetList is the repeatable --target flag.
type targetList []string

func (t *targetList) String() string { return strings.Join(*t, ",") }

func (t *targetList) Set(target string) error {
	if !strings.HasPrefix(target, "xds:") {
		return fmt.Errorf("%q is not an xds: target", target)
	}
	*t = append(*t, target)
	return nil
}

// metadataList is the repeatable --metadata flag, as key, value pairs.
type metadataList []string

func (m *metadataList) String() string { return strings.Join(*m, ",") }

func (m *metadataList) Set(entry string) error {
	key, value, found := strings.Cut(entry, "=")
	if !found || key == "" {
		return fmt.Errorf("%q is not KEY=VALUE", entry)
	}
	// Lower case, as gRPC sends metadata keys; a binary (-bin) value would need base64.
	key = strings.ToLower(key)
	if strings.HasSuffix(key, "-bin") {
		return fmt.Errorf("%q: binary metadata is not supported here", entry)
	}
	*m = append(*m, key, value)
	return nil
}

// validMethod reports whether method is a gRPC path, /SERVICE/METHOD.
func validMethod(method string) bool {
	parts := strings.Split(method, "/")
	return len(parts) == 3 && parts[0] == "" && parts[1] != "" && parts[2] != ""
}
