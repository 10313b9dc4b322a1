package io.kubegrpc.peers;

import com.google.protobuf.CodedInputStream;
import com.google.protobuf.CodedOutputStream;
import com.google.protobuf.WireFormat;
import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptors;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.Status;
import io.grpc.stub.ClientCalls;
import io.grpc.stub.MetadataUtils;
import io.grpc.stub.StreamObserver;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.OutputStream;
import java.io.UncheckedIOException;
import java.net.InetSocketAddress;
import java.net.SocketAddress;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.time.Instant;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;
import java.util.logging.Logger;

/**
 * A grpc-java xDS client peer: it dials an {@code xds:///} target through grpc-java's own xDS
 * name resolver and load balancers (grpc-xds: ADS, state of the world, against the bootstrap's
 * server) and calls {@code kubegrpc.echo.v1.Echo/Echo} at a fixed rate (open loop), counting the
 * replies per backend and the failures per gRPC code, for the Rust end-to-end tests to read over
 * a small HTTP server. The twin of the grpc-go peer (tests/peers/go/cmd/xds-client): same flags,
 * same output, same control API.
 *
 * <pre>
 * xds-client-java --target xds:///echo.ns [--target xds:///echo.other ...] [--bootstrap FILE]
 *                 [--rate N] [--timeout D] [--control IP:PORT]
 *                 [--method /SERVICE/METHOD] [--metadata KEY=VALUE ...]
 * </pre>
 *
 * <p>--method calls another method instead (for xDS routes that match on it): its request is an
 * empty message and its reply is not read, so the answering backend is the call's peer address
 * (Echo's reply names the backend itself). --metadata sends a metadata entry with every call
 * (repeat for more), for routes that match on headers.
 *
 * <p>With several targets, one channel each, the calls take turns over them: the rate is the
 * total. Unlike grpc-go, which keeps one xDS client (one ADS stream) per bootstrap, grpc-java
 * keeps one per channel target: each target opens an ADS stream of its own.
 *
 * <p>The bootstrap comes from --bootstrap, handed to grpc-java as the system property {@code
 * io.grpc.xds.bootstrap} before the first xDS channel exists (grpc-java reads it when it creates
 * its shared xDS client, and keeps that client, and so that bootstrap, for the process: one
 * bootstrap per JVM), or else from the GRPC_XDS_BOOTSTRAP (a file) or GRPC_XDS_BOOTSTRAP_CONFIG
 * (the JSON itself) environment variables. grpc-java prefers GRPC_XDS_BOOTSTRAP to the system
 * property, so --bootstrap with GRPC_XDS_BOOTSTRAP set is refused rather than silently ignored.
 *
 * <p>The control server (HTTP/1.1) answers
 *
 * <pre>
 * GET  /counts  {"ok":{"10.250.1.1:50051":123,...},"failed":{"Unavailable":2,...},"sent":N,"in_flight":M}
 * POST /reset   zeroes ok, failed, sent and in_flight, and clears /last (answers the counts before)
 * GET  /last    {"10.250.1.1:50051":1712345678901234567,...}: per backend, the Unix time in
 *               nanoseconds at which its latest successful reply arrived
 * GET  /failures [{"sent":UNIX_NS,"code":"Unavailable","message":"..."},...]: every failed call
 *               since the start, as the grpc-go peer's, but the first 10000 only and each message
 *               cut at 256 characters (grpc-java's run long): the heap is small (-Xmx128m)
 * </pre>
 *
 * <p>Counts are per window (from the start or the last reset): a call counts in the window it was
 * sent in, so ok + failed + in_flight == sent always; a reply to a call sent before a reset is not
 * counted, but still updates /last. Failures are keyed by grpc-go's code names (Unavailable,
 * DeadlineExceeded, ...), as the grpc-go peer reports them.
 *
 * <p>Stdout carries {@code control listening on IP:PORT} once the control server listens, then
 * {@code xds client ready} after the first successful reply. Errors go to stderr, at most one line
 * a second. SIGTERM or SIGINT stop the calls and the process.
 */
public final class XdsClient {
  private static final Logger logger = Logger.getLogger(XdsClient.class.getName());

  /** The system property grpc-java reads the bootstrap file's path from. */
  static final String BOOTSTRAP_PROPERTY = "io.grpc.xds.bootstrap";

  static final String SAMPLE_BOOTSTRAP =
      "{\"xds_servers\":[{\"server_uri\":\"10.250.0.1:18000\",\"channel_creds\":[{\"type\":\"insecure\"}],"
          + "\"server_features\":[\"xds_v3\",\"ignore_resource_deletion\"]}],"
          + "\"node\":{\"id\":\"kubegrpc-test\",\"locality\":{\"zone\":\"zone-a\"}}}";

  static final MethodDescriptor<byte[], byte[]> ECHO = EchoService.method("Echo");

  private XdsClient() {}

  public static void main(String[] args) throws Exception {
    Options options;
    try {
      options = Options.parse(args);
    } catch (IllegalArgumentException e) {
      System.err.println("xds-client-java: " + e.getMessage());
      System.err.println(Options.USAGE);
      System.exit(2);
      return;
    }

    if (options.bootstrap != null) {
      Path bootstrap = Path.of(options.bootstrap).toAbsolutePath();
      if (!Files.isReadable(bootstrap)) {
        fatal("cannot read the bootstrap " + bootstrap);
      }
      String fromEnvironment = System.getenv("GRPC_XDS_BOOTSTRAP");
      if (fromEnvironment != null && !fromEnvironment.isEmpty()) {
        fatal(
            "--bootstrap "
                + bootstrap
                + " given while GRPC_XDS_BOOTSTRAP="
                + fromEnvironment
                + " is set: grpc-java would read the environment's; unset one of them");
      }
      // Before any xDS channel: grpc-java reads it when it first creates its xDS client.
      System.setProperty(BOOTSTRAP_PROPERTY, bootstrap.toString());
    } else if (isEmpty(System.getenv("GRPC_XDS_BOOTSTRAP"))
        && isEmpty(System.getenv("GRPC_XDS_BOOTSTRAP_CONFIG"))
        && isEmpty(System.getProperty(BOOTSTRAP_PROPERTY))) {
      fatal("no bootstrap: give --bootstrap FILE, or set GRPC_XDS_BOOTSTRAP or GRPC_XDS_BOOTSTRAP_CONFIG");
    }

    Counts counts = new Counts();
    HttpServer control;
    try {
      control = HttpServer.create(options.control, 16);
    } catch (IOException e) {
      fatal("cannot listen on " + PeerServer.formatAddress(options.control) + ": " + e);
      return;
    }
    control.createContext("/", exchange -> serve(exchange, counts));
    control.setExecutor(Executors.newSingleThreadExecutor(daemon("control")));
    control.start();
    System.out.println("control listening on " + PeerServer.formatAddress(control.getAddress()));
    System.out.flush();

    List<ManagedChannel> channels = new ArrayList<>();
    List<Channel> callChannels = new ArrayList<>();
    for (String target : options.targets) {
      ManagedChannel channel;
      try {
        // grpc-xds registers the "xds" name resolver and its load balancers through
        // META-INF/services: nothing to call, the jar on the class path is enough.
        channel = Grpc.newChannelBuilder(target, InsecureChannelCredentials.create()).build();
      } catch (RuntimeException e) {
        fatal("cannot create the channel to " + target + ": " + e);
        return;
      }
      channel.getState(true); // resolve (fetch the xDS resources) now, not at the first call
      channels.add(channel);
      callChannels.add(
          ClientInterceptors.intercept(
              channel, MetadataUtils.newAttachHeadersInterceptor(options.metadata)));
    }
    logger.info(
        "calling "
            + options.method.getFullMethodName()
            + " at "
            + String.join(" and ", options.targets)
            + ", "
            + options.rate
            + " calls/s, deadline "
            + options.timeout
            + ", metadata "
            + options.metadata.keys());

    Caller caller = new Caller(callChannels, options.method, counts, options.timeout);
    // Open loop: call n goes out at start + n/rate, whatever happened to the calls before; a late
    // wake-up sends every call that is due.
    ScheduledExecutorService ticker = Executors.newSingleThreadScheduledExecutor(daemon("ticker"));
    long start = System.nanoTime();
    AtomicLong sent = new AtomicLong();
    long tickNanos = Math.max((long) (1e9 / options.rate), TimeUnit.MILLISECONDS.toNanos(1));
    ticker.scheduleAtFixedRate(
        () -> {
          // Nothing may escape: an exception would silently cancel every later tick.
          try {
            long due = (long) ((System.nanoTime() - start) / 1e9 * options.rate) + 1;
            for (long n = sent.get(); n < due && !caller.stopping.get(); n++) {
              sent.set(n + 1);
              caller.call(n);
            }
          } catch (RuntimeException e) {
            caller.errors.log("sending calls: " + e);
          }
        },
        0,
        tickNanos,
        TimeUnit.NANOSECONDS);

    Thread main = Thread.currentThread();
    Runtime.getRuntime()
        .addShutdownHook(
            new Thread(
                () -> {
                  // Not through java.util.logging: its own shutdown hook may have closed the
                  // handlers already.
                  System.err.println("xds-client-java: stopping: cancelling the calls in flight");
                  caller.stopping.set(true);
                  ticker.shutdownNow();
                  channels.forEach(ManagedChannel::shutdownNow);
                  try {
                    for (ManagedChannel channel : channels) {
                      channel.awaitTermination(2, TimeUnit.SECONDS);
                    }
                  } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                  }
                  control.stop(0);
                  main.interrupt();
                },
                "xds-client-shutdown"));
    try {
      channels.get(0).awaitTermination(Long.MAX_VALUE, TimeUnit.DAYS);
    } catch (InterruptedException e) {
      // stopping
    }
  }

  /** Sends the calls and counts their outcomes. */
  static final class Caller {
    final AtomicBoolean stopping = new AtomicBoolean();
    private final List<Channel> channels;
    private final MethodDescriptor<byte[], byte[]> method;
    private final boolean isEcho;
    private final Counts counts;
    private final Duration timeout;
    final RateLimitedLog errors = new RateLimitedLog(TimeUnit.SECONDS.toNanos(1));
    private final AtomicBoolean ready = new AtomicBoolean();

    Caller(
        List<Channel> channels,
        MethodDescriptor<byte[], byte[]> method,
        Counts counts,
        Duration timeout) {
      this.channels = channels;
      this.method = method;
      this.isEcho = method.getFullMethodName().equals(ECHO.getFullMethodName());
      this.counts = counts;
      this.timeout = timeout;
    }

    void call(long n) {
      long window = counts.sent();
      Instant sentAt = Instant.now();
      byte[] request = isEcho ? encodeEchoRequest(Long.toString(n)) : new byte[0];
      Channel channel = channels.get((int) (n % channels.size()));
      ClientCall<byte[], byte[]> call =
          channel.newCall(
              method,
              CallOptions.DEFAULT.withDeadlineAfter(timeout.toNanos(), TimeUnit.NANOSECONDS));
      ClientCalls.asyncUnaryCall(
          call,
          request,
          new StreamObserver<>() {
            private byte[] reply;

            @Override
            public void onNext(byte[] value) {
              reply = value;
            }

            @Override
            public void onError(Throwable t) {
              failed(n, window, sentAt, Status.fromThrowable(t));
            }

            @Override
            public void onCompleted() {
              String backend;
              if (isEcho) {
                try {
                  backend = decodeBackend(reply == null ? new byte[0] : reply);
                } catch (IOException e) {
                  failed(
                      n, window, sentAt, Status.INTERNAL.withDescription("bad EchoReply: " + e));
                  return;
                }
              } else {
                // The call is closed: its attributes are the transport's.
                SocketAddress peer = call.getAttributes().get(Grpc.TRANSPORT_ATTR_REMOTE_ADDR);
                backend =
                    peer instanceof InetSocketAddress address
                        ? PeerServer.formatAddress(address)
                        : "";
              }
              if (backend.isEmpty()) {
                failed(
                    n,
                    window,
                    sentAt,
                    Status.INTERNAL.withDescription(
                        isEcho ? "EchoReply without a backend" : "a reply without a peer address"));
                return;
              }
              counts.ok(window, backend, Instant.now());
              if (ready.compareAndSet(false, true)) {
                logger.info("first reply, from " + backend);
                System.out.println("xds client ready");
                System.out.flush();
              }
            }
          });
    }

    private void failed(long n, long window, Instant sentAt, Status status) {
      if (stopping.get()) {
        counts.forget(window); // stopping: not the backends' fault
        return;
      }
      counts.failed(window, sentAt, goCodeName(status.getCode()), describe(status));
      errors.log("call " + n + ": " + describe(status));
    }
  }

  /** One line: the code, the description and the cause's message (no stack trace). */
  static String describe(Status status) {
    StringBuilder line = new StringBuilder(status.getCode().name());
    if (status.getDescription() != null) {
      line.append(": ").append(status.getDescription());
    }
    if (status.getCause() != null) {
      line.append(" (cause: ").append(status.getCause()).append(')');
    }
    return line.toString().replaceAll("\\s*\\R\\s*", " ");
  }

  // === the control server ===

  private static void serve(HttpExchange exchange, Counts counts) throws IOException {
    try (exchange) {
      String method = exchange.getRequestMethod();
      String path = exchange.getRequestURI().getPath();
      String body;
      switch (path) {
        case "/counts" -> body = method.equals("GET") ? counts.snapshot(false) : null;
        case "/reset" -> body = method.equals("POST") ? counts.snapshot(true) : null;
        case "/last" -> body = method.equals("GET") ? counts.lastReplies() : null;
        case "/failures" -> body = method.equals("GET") ? counts.failures() : null;
        default -> {
          respond(exchange, 404, "text/plain; charset=utf-8", "404 page not found\n");
          return;
        }
      }
      if (body == null) {
        respond(exchange, 405, "text/plain; charset=utf-8", "Method Not Allowed\n");
        return;
      }
      respond(exchange, 200, "application/json", body + "\n");
    }
  }

  private static void respond(HttpExchange exchange, int code, String type, String body)
      throws IOException {
    exchange.getRequestBody().readAllBytes();
    byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
    exchange.getResponseHeaders().set("Content-Type", type);
    exchange.sendResponseHeaders(code, bytes.length);
    try (OutputStream out = exchange.getResponseBody()) {
      out.write(bytes);
    }
  }

  /** The control server's counts, per window (from the start or the last reset). */
  static final class Counts {
    /** Which window the counts are for: reset starts a new one. */
    private long window;

    private Map<String, Long> okBy = new TreeMap<>();
    private Map<String, Long> failedBy = new TreeMap<>();
    private long sent;
    private long inFlight;
    private Map<String, Long> last = new TreeMap<>();

    /** Bounds /failures: at most about 3 MB with MAX_FAILURE_MESSAGE. */
    static final int MAX_FAILURES = 10_000;

    static final int MAX_FAILURE_MESSAGE = 256;

    /** Every failed call since the start: sent (Unix ns), code, message. */
    private final List<String[]> failures = new ArrayList<>();

    /** Counts a call sent and returns its window. */
    synchronized long sent() {
      sent++;
      inFlight++;
      return window;
    }

    synchronized void ok(long window, String backend, Instant at) {
      last.put(backend, at.getEpochSecond() * 1_000_000_000L + at.getNano());
      if (window == this.window) {
        inFlight--;
        okBy.merge(backend, 1L, Long::sum);
      }
    }

    synchronized void failed(long window, Instant sent, String code, String message) {
      if (failures.size() < MAX_FAILURES) {
        failures.add(
            new String[] {
              Long.toString(sent.getEpochSecond() * 1_000_000_000L + sent.getNano()),
              code,
              message.length() > MAX_FAILURE_MESSAGE
                  ? message.substring(0, MAX_FAILURE_MESSAGE)
                  : message
            });
      }
      if (window == this.window) {
        inFlight--;
        failedBy.merge(code, 1L, Long::sum);
      }
    }

    /** Uncounts a call that ended without an outcome. */
    synchronized void forget(long window) {
      if (window == this.window) {
        inFlight--;
        sent--;
      }
    }

    /** The counts as JSON; with reset it also starts a new window. */
    synchronized String snapshot(boolean reset) {
      StringBuilder json = new StringBuilder("{\"ok\":");
      writeMap(json, okBy);
      json.append(",\"failed\":");
      writeMap(json, failedBy);
      json.append(",\"sent\":").append(sent).append(",\"in_flight\":").append(inFlight).append('}');
      if (reset) {
        window++;
        okBy = new TreeMap<>();
        failedBy = new TreeMap<>();
        sent = 0;
        inFlight = 0;
        last = new TreeMap<>();
      }
      return json.toString();
    }

    /** Every failed call since the start (the first MAX_FAILURES), as JSON. */
    synchronized String failures() {
      StringBuilder json = new StringBuilder("[");
      for (String[] failure : failures) {
        if (json.length() > 1) {
          json.append(',');
        }
        json.append("{\"sent\":").append(failure[0]).append(",\"code\":");
        writeString(json, failure[1]);
        json.append(",\"message\":");
        writeString(json, failure[2]);
        json.append('}');
      }
      return json.append(']').toString();
    }

    synchronized String lastReplies() {
      StringBuilder json = new StringBuilder();
      writeMap(json, last);
      return json.toString();
    }
  }

  // === JSON, by hand: objects of numbers by string ===

  static void writeMap(StringBuilder json, Map<String, Long> map) {
    json.append('{');
    boolean first = true;
    for (Map.Entry<String, Long> entry : map.entrySet()) {
      if (!first) {
        json.append(',');
      }
      first = false;
      writeString(json, entry.getKey());
      json.append(':').append(entry.getValue().longValue());
    }
    json.append('}');
  }

  static void writeString(StringBuilder json, String value) {
    json.append('"');
    for (int i = 0; i < value.length(); i++) {
      char c = value.charAt(i);
      switch (c) {
        case '"' -> json.append("\\\"");
        case '\\' -> json.append("\\\\");
        case '\n' -> json.append("\\n");
        case '\r' -> json.append("\\r");
        case '\t' -> json.append("\\t");
        default -> {
          if (c < 0x20) {
            json.append(String.format("\\u%04x", (int) c));
          } else {
            json.append(c);
          }
        }
      }
    }
    json.append('"');
  }

  // === the echo messages (as EchoService encodes them) ===

  /** EchoRequest { string message = 1; uint32 delay_ms = 2; } (no delay). */
  static byte[] encodeEchoRequest(String message) {
    try {
      ByteArrayOutputStream bytes = new ByteArrayOutputStream();
      CodedOutputStream out = CodedOutputStream.newInstance(bytes);
      if (!message.isEmpty()) {
        out.writeString(1, message);
      }
      out.flush();
      return bytes.toByteArray();
    } catch (IOException e) {
      throw new UncheckedIOException(e);
    }
  }

  /** EchoReply { string message = 1; string backend = 2; }: the backend ("" if absent). */
  static String decodeBackend(byte[] reply) throws IOException {
    String backend = "";
    CodedInputStream input = CodedInputStream.newInstance(reply);
    for (int tag = input.readTag(); tag != 0; tag = input.readTag()) {
      if (WireFormat.getTagFieldNumber(tag) == 2
          && WireFormat.getTagWireType(tag) == WireFormat.WIRETYPE_LENGTH_DELIMITED) {
        backend = input.readStringRequireUtf8();
      } else if (!input.skipField(tag)) {
        break;
      }
    }
    return backend;
  }

  /** The name grpc-go gives a code (codes.Code.String()), so both peers report alike. */
  static String goCodeName(Status.Code code) {
    return switch (code) {
      case OK -> "OK";
      case CANCELLED -> "Canceled";
      case UNKNOWN -> "Unknown";
      case INVALID_ARGUMENT -> "InvalidArgument";
      case DEADLINE_EXCEEDED -> "DeadlineExceeded";
      case NOT_FOUND -> "NotFound";
      case ALREADY_EXISTS -> "AlreadyExists";
      case PERMISSION_DENIED -> "PermissionDenied";
      case RESOURCE_EXHAUSTED -> "ResourceExhausted";
      case FAILED_PRECONDITION -> "FailedPrecondition";
      case ABORTED -> "Aborted";
      case OUT_OF_RANGE -> "OutOfRange";
      case UNIMPLEMENTED -> "Unimplemented";
      case INTERNAL -> "Internal";
      case UNAVAILABLE -> "Unavailable";
      case DATA_LOSS -> "DataLoss";
      case UNAUTHENTICATED -> "Unauthenticated";
    };
  }

  /** Prints at most one line per period, saying how many it held back meanwhile. */
  static final class RateLimitedLog {
    private final long everyNanos;
    private long next = System.nanoTime();
    private final AtomicLong suppressed = new AtomicLong();

    RateLimitedLog(long everyNanos) {
      this.everyNanos = everyNanos;
    }

    void log(String message) {
      synchronized (this) {
        long now = System.nanoTime();
        if (now - next < 0) {
          suppressed.incrementAndGet();
          return;
        }
        next = now + everyNanos;
      }
      long held = suppressed.getAndSet(0);
      if (held > 0) {
        message += " (and " + held + " more errors since the last line)";
      }
      logger.warning(message);
    }
  }

  private static java.util.concurrent.ThreadFactory daemon(String name) {
    return runnable -> {
      Thread thread = new Thread(runnable, "xds-client-" + name);
      thread.setDaemon(true);
      return thread;
    };
  }

  private static boolean isEmpty(String value) {
    return value == null || value.isEmpty();
  }

  private static void fatal(String message) {
    logger.severe(message);
    System.exit(1);
  }

  /** The command line. */
  static final class Options {
    static final String USAGE =
        "usage: xds-client-java --target xds:///NAME.NAMESPACE [--target ...] [--bootstrap FILE]\n"
            + "                       [--rate N] [--timeout DURATION] [--control IP:PORT]\n"
            + "                       [--method /SERVICE/METHOD] [--metadata KEY=VALUE ...]\n"
            + "  --target     an xDS target (required; repeat for more: the calls take turns)\n"
            + "  --bootstrap  the xDS bootstrap JSON file (default: GRPC_XDS_BOOTSTRAP or\n"
            + "               GRPC_XDS_BOOTSTRAP_CONFIG from the environment)\n"
            + "  --rate       calls per second, sent on schedule whatever the replies (default 100)\n"
            + "  --timeout    each call's deadline, like 2s or 500ms (default 2s)\n"
            + "  --control    the control server's address (default 127.0.0.1:0: any free port)\n"
            + "  --method     the method to call (default /kubegrpc.echo.v1.Echo/Echo; another gets an\n"
            + "               empty request, its reply unread, the backend its peer address)\n"
            + "  --metadata   a metadata entry sent with every call (repeat for more)\n"
            + "A sample bootstrap:\n  "
            + SAMPLE_BOOTSTRAP;

    final List<String> targets = new ArrayList<>();
    String bootstrap;
    double rate = 100;
    Duration timeout = Duration.ofSeconds(2);
    InetSocketAddress control;
    MethodDescriptor<byte[], byte[]> method = ECHO;
    final Metadata metadata = new Metadata();

    static Options parse(String[] args) {
      Options options = new Options();
      String controlArg = "127.0.0.1:0";
      for (int i = 0; i < args.length; i++) {
        String arg = args[i];
        // Go's flag syntax: -flag or --flag, with the value next or after "=".
        if (arg.startsWith("-") && !arg.startsWith("--")) {
          arg = "-" + arg;
        }
        String value = null;
        int equals = arg.indexOf('=');
        if (arg.startsWith("--") && equals > 0) {
          value = arg.substring(equals + 1);
          arg = arg.substring(0, equals);
        }
        if (!arg.equals("--target")
            && !arg.equals("--bootstrap")
            && !arg.equals("--rate")
            && !arg.equals("--timeout")
            && !arg.equals("--control")
            && !arg.equals("--method")
            && !arg.equals("--metadata")) {
          throw new IllegalArgumentException("unknown argument " + args[i]);
        }
        if (value == null) {
          if (i + 1 >= args.length) {
            throw new IllegalArgumentException(arg + " needs a value");
          }
          value = args[++i];
        }
        switch (arg) {
          case "--target" -> {
            if (!value.startsWith("xds:")) {
              throw new IllegalArgumentException("--target wants xds:///NAME.NAMESPACE, not " + value);
            }
            options.targets.add(value);
          }
          case "--bootstrap" -> options.bootstrap = value;
          case "--rate" -> {
            try {
              options.rate = Double.parseDouble(value);
            } catch (NumberFormatException e) {
              throw new IllegalArgumentException("--rate wants a number, not " + value);
            }
          }
          case "--timeout" -> options.timeout = PeerServer.Options.parseDuration(value);
          case "--method" -> options.method = parseMethod(value);
          case "--metadata" -> addMetadata(options.metadata, value);
          default -> controlArg = value;
        }
      }
      if (options.targets.isEmpty()) {
        throw new IllegalArgumentException("--target xds:///NAME.NAMESPACE is required");
      }
      if (!(options.rate > 0) || options.rate > 1e6) {
        throw new IllegalArgumentException("--rate must be in (0, 1e6], not " + options.rate);
      }
      if (options.timeout.isZero() || options.timeout.isNegative()) {
        throw new IllegalArgumentException("--timeout must be positive");
      }
      try {
        options.control = PeerServer.Options.parseAddress(controlArg);
      } catch (IllegalArgumentException e) {
        throw new IllegalArgumentException("--control wants IP:PORT, not " + controlArg);
      }
      return options;
    }

    /** /SERVICE/METHOD, a unary method of raw bytes. */
    static MethodDescriptor<byte[], byte[]> parseMethod(String path) {
      String[] parts = path.split("/", -1);
      if (parts.length != 3 || !parts[0].isEmpty() || parts[1].isEmpty() || parts[2].isEmpty()) {
        throw new IllegalArgumentException("--method wants /SERVICE/METHOD, not " + path);
      }
      return MethodDescriptor.<byte[], byte[]>newBuilder()
          .setType(MethodDescriptor.MethodType.UNARY)
          .setFullMethodName(MethodDescriptor.generateFullMethodName(parts[1], parts[2]))
          .setRequestMarshaller(EchoService.BYTES)
          .setResponseMarshaller(EchoService.BYTES)
          .build();
    }

    /** KEY=VALUE, the key lower case as gRPC sends it; binary (-bin) keys are refused. */
    static void addMetadata(Metadata metadata, String entry) {
      int equals = entry.indexOf('=');
      if (equals <= 0) {
        throw new IllegalArgumentException("--metadata wants KEY=VALUE, not " + entry);
      }
      String key = entry.substring(0, equals).toLowerCase(java.util.Locale.ROOT);
      if (key.endsWith(Metadata.BINARY_HEADER_SUFFIX)) {
        throw new IllegalArgumentException("--metadata: binary metadata is not supported here: " + entry);
      }
      metadata.put(Metadata.Key.of(key, Metadata.ASCII_STRING_MARSHALLER), entry.substring(equals + 1));
    }
  }
}
