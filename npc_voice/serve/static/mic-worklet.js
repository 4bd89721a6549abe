// The microphone's AudioWorklet: mono float samples at the AudioContext's rate to PCM16 LE chunks of
// 20 ms, posted to the page (which sends them to the server as binary frames). With no input
// connected (no microphone) it posts silence, so that the server keeps hearing something.
class MicPCM16 extends AudioWorkletProcessor {
  constructor() {
    super();
    this.chunk = Math.round(sampleRate / 50);
    this.buf = new Int16Array(this.chunk);
    this.fill = 0;
    this.peak = 0;
  }

  process(inputs) {
    const input = inputs[0];
    const ch = input && input.length ? input[0] : null;
    const n = ch ? ch.length : 128;
    for (let i = 0; i < n; i++) {
      let x = ch ? ch[i] : 0;
      x = x > 1 ? 1 : x < -1 ? -1 : x;
      const a = x < 0 ? -x : x;
      if (a > this.peak) this.peak = a;
      this.buf[this.fill++] = Math.round(x * 32767);
      if (this.fill === this.chunk) {
        this.port.postMessage({ pcm: this.buf.buffer, peak: this.peak }, [this.buf.buffer]);
        this.buf = new Int16Array(this.chunk);
        this.fill = 0;
        this.peak = 0;
      }
    }
    return true;
  }
}

registerProcessor("mic-pcm16", MicPCM16);
